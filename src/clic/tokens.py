"""Placeholder tokens (<v*>, <v1*>, ...): add them to the tokenizer and give them trainable embeddings.

The text encoder's embedding table stays frozen and untouched. Its ``token_embedding`` module is wrapped by
:class:`ConceptTokenEmbedding`, which looks up new ids (>= the base vocabulary size) in a small trainable
matrix. So exactly the new rows train, and no other row can drift (the official code zeroes the gradients of
the other rows instead, with an off-by-one for several tokens).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .errors import InputError

log = logging.getLogger(__name__)


class ConceptTokenEmbedding(nn.Module):
    """``nn.Embedding`` look-up over [frozen base table ; trainable rows of the placeholder tokens]."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.num_base = base.num_embeddings
        self.new = nn.Parameter(torch.zeros(0, base.embedding_dim, device=base.weight.device))
        self.tokens: list[str] = []

    @property
    def weight(self) -> torch.Tensor:  # what transformers' code may read; the frozen base table
        return self.base.weight

    def add(self, tokens: list[str], vectors: torch.Tensor) -> None:
        vectors = vectors.detach().float().to(self.base.weight.device).reshape(len(tokens), -1)
        self.new = nn.Parameter(torch.cat([self.new.detach(), vectors]))
        self.tokens += list(tokens)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.num_base - 1))
        is_new = input_ids >= self.num_base
        if self.new.shape[0] == 0:
            return out
        new = self.new[(input_ids - self.num_base).clamp(0, self.new.shape[0] - 1)].to(out.dtype)
        return torch.where(is_new[..., None], new, out)


def concept_embedding(text_encoder) -> ConceptTokenEmbedding:
    """The text encoder's :class:`ConceptTokenEmbedding`, installed on first use."""
    embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings  # transformers 4 | 5
    if not isinstance(embeddings.token_embedding, ConceptTokenEmbedding):
        embeddings.token_embedding = ConceptTokenEmbedding(embeddings.token_embedding)
    return embeddings.token_embedding


def check_placeholder(tokenizer, token: str) -> None:
    vocab = tokenizer.get_vocab()
    if token in vocab or token + "</w>" in vocab or token.lower() + "</w>" in vocab:
        raise InputError(f"placeholder {token!r} is already in the tokenizer's vocabulary; choose a new string like <v*>")
    if any(ch.isspace() for ch in token) or not token:
        raise InputError(f"placeholder {token!r} must be a non-empty string without spaces")


def initializer_embedding(backbone, word: str) -> torch.Tensor:
    """Embedding row of a single-token initializer word (e.g. "pattern")."""
    ids = backbone.tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = backbone.tokenizer.tokenize(word)
        raise InputError(f"initializer word {word!r} is not a single token of the vocabulary (splits into {pieces}); "
                         "pick a common word such as 'pattern' or 'ornament'")
    return concept_embedding(backbone.text_encoder).base.weight[ids[0]].detach().float().clone()


def add_placeholders(backbone, tokens: list[str], vectors: torch.Tensor) -> list[int]:
    """Add placeholder tokens with the given initial embeddings; returns their ids."""
    if len(set(tokens)) != len(tokens):
        raise InputError(f"placeholder tokens must be distinct, got {tokens}")
    for token in tokens:
        check_placeholder(backbone.tokenizer, token)
    emb = concept_embedding(backbone.text_encoder)
    first = emb.num_base + emb.new.shape[0]
    backbone.tokenizer.add_tokens(list(tokens))
    ids = backbone.tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(first, first + len(tokens))):
        raise InputError(f"tokenizer and text encoder disagree on new token ids ({ids} vs {first}...)")
    emb.add(tokens, vectors)
    return ids


def token_positions(input_ids: torch.Tensor, token_ids: list[int], prompt: str = "") -> torch.Tensor:
    """Positions ``(batch, n_tokens)`` of each token id in each tokenized prompt (found by tokenizing, not by hand)."""
    rows = []
    for row in input_ids:
        pos = []
        for tid in token_ids:
            hits = (row == tid).nonzero().flatten()
            if len(hits) == 0:
                raise InputError(f"prompt {prompt!r} does not contain the concept token (id {tid})")
            pos.append(int(hits[0]))
        rows.append(pos)
    return torch.tensor(rows, dtype=torch.long, device=input_ids.device)


def free_placeholder(backbone, wanted: str) -> str:
    """``wanted`` if the tokenizer does not know it yet, else its numbered variants <w2*>, <w3*>, ... (each
    learning run on a backbone adds its token to that backbone's tokenizer)."""
    stem = wanted.rstrip(">").rstrip("*")
    for k in range(1, 1000):
        name = wanted if k == 1 else f"{stem}{k}*>"
        try:
            check_placeholder(backbone.tokenizer, name)
            if k > 1:
                log.info("placeholder %s is taken in this process; using %s", wanted, name)
            return name
        except InputError:
            if k == 1 and (not wanted or any(ch.isspace() for ch in wanted)):
                raise
    raise InputError(f"no free name for the placeholder {wanted}")
