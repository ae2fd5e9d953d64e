"""Placeholder tokens (<v*>, <v1*>, ...): add them to the tokenizer and give them trainable embeddings.

The text encoder's embedding table stays frozen and untouched. Its ``token_embedding`` module is wrapped by
:class:`ConceptTokenEmbedding`, which looks up new ids (>= the base vocabulary size) in a small trainable
matrix. So exactly the new rows train, and no other row can drift (the official code zeroes the gradients of
the other rows instead, with an off-by-one for several tokens).

A backbone with several text encoders (SDXL: CLIP ViT-L and OpenCLIP bigG, one vocabulary) gets each token in every
tokenizer, under the same id, and a row in every encoder's table, all trained (as diffusers' SDXL textual inversion
does). A token's embedding, as functions here take and give it, is those rows side by side: ``(sum of the encoders'
embedding sizes,)``, in the order of ``backbone.text_encoders``.

:func:`restored_vocabulary` puts the tokenizer and the embedding module back as they were: tokens added inside
are gone afterwards (:func:`clic.concept.applied_concept` uses it, so no call leaves tokens behind).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator

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


def _embeddings(text_encoder) -> nn.Module:
    return getattr(text_encoder, "text_model", text_encoder).embeddings  # transformers 4 | 5


def concept_embedding(text_encoder) -> ConceptTokenEmbedding:
    """The text encoder's :class:`ConceptTokenEmbedding`, installed on first use."""
    embeddings = _embeddings(text_encoder)
    if not isinstance(embeddings.token_embedding, ConceptTokenEmbedding):
        embeddings.token_embedding = ConceptTokenEmbedding(embeddings.token_embedding)
    return embeddings.token_embedding


def concept_embeddings(backbone) -> list[ConceptTokenEmbedding]:
    """Each text encoder's :class:`ConceptTokenEmbedding` (installed on first use)."""
    return [concept_embedding(encoder) for encoder in backbone.text_encoders]


def split_rows(backbone, vectors: torch.Tensor) -> list[torch.Tensor]:
    """``(n, sum of dims)`` embeddings -> each text encoder's ``(n, dim)`` part."""
    dims = backbone.embedding_dims
    if vectors.shape[-1] != sum(dims):
        raise InputError(f"token embeddings of size {vectors.shape[-1]} do not fit the text encoders ({dims})")
    return list(vectors.reshape(-1, sum(dims)).split(dims, dim=-1))


def base_table(text_encoder) -> torch.Tensor:
    """The frozen embedding table ``(vocab, dim)`` (wrapped or not)."""
    module = _embeddings(text_encoder).token_embedding
    return module.base.weight if isinstance(module, ConceptTokenEmbedding) else module.weight


def check_placeholder(tokenizer, token: str) -> None:
    vocab = tokenizer.get_vocab()
    if token in vocab or token + "</w>" in vocab or token.lower() + "</w>" in vocab:
        raise InputError(f"placeholder {token!r} is already in the tokenizer's vocabulary; choose a new string like <v*>")
    if any(ch.isspace() for ch in token) or not token:
        raise InputError(f"placeholder {token!r} must be a non-empty string without spaces")


#: ``--initializer piece:NAME`` names a vocabulary entry as it is spelled there, e.g. a sub-word piece
PIECE = "piece:"


def initializer_id(tokenizer, word: str) -> int:
    """The vocabulary id of an initializer: a word that tokenizes to one token (e.g. "pattern"), or ``piece:NAME``,
    the entry NAME of the vocabulary as it is spelled there (word-final pieces end in ``</w>``, sub-word pieces do
    not). The official code passes its initializer to the tokenizer as a ready token, so its "ktn" is the sub-word
    piece ``piece:ktn`` (id 42170 in CLIP's vocabulary), not the word "ktn" (which is two pieces)."""
    if word.startswith(PIECE):
        name = word[len(PIECE):]
        piece_id = tokenizer.get_vocab().get(name)
        if piece_id is None:
            raise InputError(f"initializer {word!r}: {name!r} is not an entry of the tokenizer's vocabulary")
        return int(piece_id)
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.tokenize(word)
        raise InputError(f"initializer word {word!r} is not a single token of the vocabulary (splits into {pieces}); "
                         f"pick a common word such as 'pattern' or 'ornament', or name one piece: {PIECE}{pieces[0]}")
    return ids[0]


def initializer_embedding(backbone, word: str) -> torch.Tensor:
    """Embedding of an initializer (:func:`initializer_id`: a single-token word such as "pattern", or ``piece:NAME``):
    its row in each text encoder's table, side by side."""
    index = initializer_id(backbone.tokenizer, word)
    return torch.cat([base_table(encoder)[index].detach().float() for encoder in backbone.text_encoders]).clone()


def add_placeholders(backbone, tokens: list[str], vectors: torch.Tensor) -> list[int]:
    """Add placeholder tokens to every tokenizer, with the given initial embeddings ``(n, sum of dims)`` in every text
    encoder; returns their ids (the same in each tokenizer)."""
    if len(set(tokens)) != len(tokens):
        raise InputError(f"placeholder tokens must be distinct, got {tokens}")
    for token in tokens:
        for tokenizer in backbone.tokenizers:
            check_placeholder(tokenizer, token)
    parts = split_rows(backbone, vectors)
    embeddings = concept_embeddings(backbone)
    first = embeddings[0].num_base + embeddings[0].new.shape[0]
    for tokenizer, emb in zip(backbone.tokenizers, embeddings):
        _add_tokens(tokenizer, list(tokens))
        ids = tokenizer.convert_tokens_to_ids(list(tokens))
        if ids != list(range(first, first + len(tokens))) or emb.num_base + emb.new.shape[0] != first:
            raise InputError(f"tokenizers and text encoders disagree on new token ids ({ids} vs {first}...)")
    for emb, part in zip(embeddings, parts):
        emb.add(tokens, part)
    return ids


def set_placeholders(backbone, tokens: list[str], vectors: torch.Tensor) -> list[int]:
    """Add placeholder tokens with these embeddings ``(n, sum of dims)``, or, if all of them are there already (an
    outer application of the same concept), give them these embeddings; returns their ids."""
    embeddings = concept_embeddings(backbone)
    if not tokens or not all(t in embeddings[0].tokens for t in tokens):
        return add_placeholders(backbone, tokens, vectors.to(backbone.device))
    for emb, part in zip(embeddings, split_rows(backbone, vectors)):
        rows = emb.new.detach().clone()           # a new parameter: the one an outer scope saved stays as it was
        for token, vector in zip(tokens, part):
            rows[emb.tokens.index(token)] = vector.to(rows.device)
        emb.new = nn.Parameter(rows, requires_grad=emb.new.requires_grad)
    return backbone.tokenizer.convert_tokens_to_ids(list(tokens))


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


# ---------------------------------------------------------------------------------------------- restoring

#: copy-on-write of fast tokenizers' back ends (see _add_tokens): (content hash, tokens) -> a back end with the tokens
_WITH_TOKENS: OrderedDict[tuple[str, tuple[str, ...]], object] = OrderedDict()
_HASHES: OrderedDict[int, tuple[object, str]] = OrderedDict()      # id(back end) -> (back end, content hash)


def _content_hash(backend) -> str:
    memo = _HASHES.get(id(backend))
    if memo is None or memo[0] is not backend:
        memo = (backend, hashlib.sha256(backend.to_str().encode()).hexdigest())
        _HASHES[id(backend)] = memo          # the back end is kept alive: its id stays its own
        while len(_HASHES) > 8:
            _HASHES.popitem(last=False)
    return memo[1]


def _add_tokens(tokenizer, tokens: list[str]) -> None:
    """``tokenizer.add_tokens(tokens)``, copy-on-write for a fast tokenizer: its back end (which holds the added
    tokens and cannot drop them) is replaced by a copy with the tokens, so the back end :func:`restored_vocabulary`
    saved stays as it was. A copy of a 49k-token vocabulary takes a tenth of a second, so copies are kept, by the
    back end's content and the tokens, for the next time (every model loaded from the same files shares them)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):           # a slow (Python) tokenizer
        tokenizer.add_tokens(tokens)
        return
    key = (_content_hash(backend), tuple(tokens))
    size = backend.get_vocab_size(with_added_tokens=True)
    cached = _WITH_TOKENS.get(key)
    if cached is not None and cached.get_vocab_size(with_added_tokens=True) == size + len(tokens) \
            and [cached.token_to_id(t) for t in tokens] == list(range(size, size + len(tokens))):
        _WITH_TOKENS.move_to_end(key)
        tokenizer._tokenizer = cached
        return
    tokenizer._tokenizer = copy.deepcopy(backend)
    tokenizer.add_tokens(tokens)
    _WITH_TOKENS[key] = tokenizer._tokenizer
    while len(_WITH_TOKENS) > 8:
        _WITH_TOKENS.popitem(last=False)


@contextlib.contextmanager
def restored_vocabulary(backbone) -> Iterator[None]:
    """Whatever tokens the body adds, the tokenizers and the text encoders' token embeddings are as they were
    afterwards: same vocabulary (``len(tokenizer)``), same embedding modules and rows."""
    with contextlib.ExitStack() as stack:
        for tokenizer, encoder in zip(backbone.tokenizers, backbone.text_encoders):
            stack.enter_context(_restored_pair(tokenizer, encoder))
        yield


@contextlib.contextmanager
def _restored_pair(tokenizer, text_encoder) -> Iterator[None]:
    backend = getattr(tokenizer, "_tokenizer", None)
    slow = {name: copy.copy(getattr(tokenizer, name)) for name in ("_added_tokens_decoder", "_added_tokens_encoder")
            if backend is None and isinstance(getattr(tokenizer, name, None), dict)}
    embeddings = _embeddings(text_encoder)
    module = embeddings.token_embedding
    rows = tokens = None
    if isinstance(module, ConceptTokenEmbedding):
        rows, tokens = module.new, list(module.tokens)
    try:
        yield
    finally:
        if backend is not None:
            tokenizer._tokenizer = backend
        elif slow:
            for name, value in slow.items():
                setattr(tokenizer, name, value)
            if hasattr(tokenizer, "_update_trie"):
                tokenizer._update_trie()
        embeddings.token_embedding = module
        if rows is not None:
            module.new, module.tokens = rows, tokens
