"""The concept file: one small safetensors file holding what was learned.

Layout (format ``clic-concept/1``):

- ``token_embeddings``: ``(n_tokens, dim)`` fp32, the learned v* rows (one per placeholder token; with several
  text encoders, SDXL's, each token's rows in every encoder side by side: dim = 768 + 1280);
- ``attn.<processor key>.<to_k|to_v|to_q|to_out.0>.<weight|bias>``: the trained cross-attention copies
  (full matrices, as Custom Diffusion stores them);
- metadata (strings, JSON): tokens, base model id, its architecture hash and weight statistics, prompt,
  object class, method, hyper-parameters, package version.

Loading checks the file is a clic concept and that it was made for the backbone it is applied to. Files are
never unpickled.

:func:`applied_concept` applies a concept to a backbone for the body of a ``with`` (for sampling, or trainable for
learning) and leaves the backbone as it found it: vocabulary, embedding rows, attention processors and
``requires_grad`` flags. A concept in a stock diffusers pipeline, and its export folder: :mod:`clic.stock`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .attention import ClicCrossAttnProcessor, clic_processors, install_processors, restored_processors
from .checks import check_concept_file
from .errors import ConceptFileError
from .fileio import atomic_path, readable_file
from .tokens import (ConceptTokenEmbedding, add_placeholders, concept_embeddings, restored_vocabulary,
                     set_placeholders)

#: what a concept's attention weights train as (``train`` of :meth:`Concept.apply`): None = frozen
TRAINABLE = (None, "kv", "kv+q+out", "token")

FORMAT = "clic-concept/1"


@dataclass
class Concept:
    tokens: list[str]
    embeddings: torch.Tensor
    attn_weights: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    # -- building -------------------------------------------------------------------------------------------
    @classmethod
    def from_training(cls, backbone, tokens: list[str], embeddings: torch.Tensor,
                      processors: dict[str, ClicCrossAttnProcessor], **meta) -> "Concept":
        weights = {}
        for name, proc in processors.items():
            for sub, linear in proc.trained_linears().items():
                weights[f"attn.{name}.{sub}.weight"] = linear.weight.detach().float().cpu().clone()
                if linear.bias is not None:
                    weights[f"attn.{name}.{sub}.bias"] = linear.bias.detach().float().cpu().clone()
        info = {
            "format": FORMAT, "clic_version": __version__, "tokens": list(tokens),
            "base_model": backbone.model_id, "base_config_hash": backbone.config_hash(),
            "base_weight_stats": backbone.weight_stats(), "embedding_dims": backbone.embedding_dims, **meta,
        }
        return cls(list(tokens), embeddings.detach().float().cpu().clone(), weights, info)

    @classmethod
    def untrained(cls, tokens: list[str], embeddings: torch.Tensor) -> "Concept":
        """The starting point of learning: the tokens at their initial embeddings ``(n_tokens, dim)``, no attention
        weights of its own (it is built for the backbone at hand: no base model to check)."""
        return cls(list(tokens), embeddings.detach().float(), {}, {})

    @property
    def trains_q_out(self) -> bool:
        return any(".to_q." in k for k in self.attn_weights)

    @property
    def layers(self) -> list[str]:
        """The cross-attention layers (processor keys) the concept has weights for."""
        return sorted({split_weight_key(k)[0] for k in self.attn_weights})

    # -- file -----------------------------------------------------------------------------------------------
    def save(self, path, dtype: torch.dtype = torch.float32) -> Path:
        path = Path(path)
        tensors = {"token_embeddings": self.embeddings.contiguous()}
        tensors.update({k: v.to(dtype).contiguous() for k, v in self.attn_weights.items()})
        metadata = {"format": "pt", "clic": json.dumps(self.meta, default=str)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return path

    @classmethod
    def load(cls, path) -> "Concept":
        path = readable_file(path, "concept file", ConceptFileError)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ConceptFileError(f"{path}: not a valid safetensors concept file ({str(exc).splitlines()[0]})") from exc
        try:
            meta = json.loads(metadata["clic"])
        except (KeyError, json.JSONDecodeError, RecursionError) as exc:
            raise ConceptFileError(f"{path}: safetensors file without clic concept metadata") from exc
        check_concept_file(path, meta, tensors, FORMAT)
        emb = tensors.pop("token_embeddings").float()
        return cls(list(meta["tokens"]), emb, {k: v.float() for k, v in tensors.items()}, meta)

    # -- applying to a backbone -----------------------------------------------------------------------------
    def check_base(self, backbone, name: str = "concept") -> None:
        """Refuse a concept made for another base model (architecture hash, then weight statistics)."""
        want = self.meta.get("base_config_hash")
        if want != backbone.config_hash():
            raise ConceptFileError(
                f"{name} was made for base model {self.meta.get('base_model')!r} (architecture {want}), "
                f"not for {backbone.model_id!r} (architecture {backbone.config_hash()})")
        stats = self.meta.get("base_weight_stats") or []
        have = backbone.weight_stats()
        if len(stats) != len(have) or any(not math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-4) for a, b in zip(stats, have)):
            raise ConceptFileError(
                f"{name} was made for base model {self.meta.get('base_model')!r}, whose weights differ from "
                f"{backbone.model_id!r} (same architecture, other checkpoint)")
        if self.embeddings.shape[1] != sum(backbone.embedding_dims):
            raise ConceptFileError(f"{name}: embedding size {self.embeddings.shape[1]} does not fit the text "
                                   f"encoder(s) ({'+'.join(map(str, backbone.embedding_dims))})")

    def apply(self, backbone, name: str = "concept", train: str | None = None,
              processor_class: type[ClicCrossAttnProcessor] = ClicCrossAttnProcessor
              ) -> dict[str, ClicCrossAttnProcessor]:
        """Add the concept's tokens (or refresh their embeddings if they are there) and install its cross-attention
        weights on ``backbone.unet``, for good: :func:`applied_concept` does the same for the body of a ``with``.

        ``train`` (learning): ``"kv"`` / ``"kv+q+out"`` puts trainable fp32 copies of those matrices on every
        cross-attention layer (the concept's weights where it has them, the base model's elsewhere); ``"token"``
        and None keep them frozen. A concept without attention weights (a token only, e.g. w*, sec. 3.3) keeps
        the cross-attention processors that are installed (e.g. another concept's K/V), or gets plain ones.
        Returns the cross-attention processors (``{layer name: processor}``).
        """
        if train not in TRAINABLE:
            raise ValueError(f"unknown trainable set {train!r}; use one of {TRAINABLE}")
        if self.meta:                       # a file names its base model; an untrained concept is this backbone's
            self.check_base(backbone, name)
        unet = backbone.unet
        if train is None:
            set_placeholders(backbone, self.tokens, self.embeddings)
        else:                               # learning: new tokens, the last rows of the embedding (refused if known)
            add_placeholders(backbone, self.tokens, self.embeddings.to(backbone.device))
        if train in ("kv", "kv+q+out"):
            procs = install_processors(unet, train_kv=True, train_q_out=train == "kv+q+out",
                                       processor_class=processor_class)
        elif self.attn_weights:
            procs = install_processors(unet, train_kv=True, train_q_out=self.trains_q_out, layers=self.layers,
                                       processor_class=processor_class)
        else:
            procs = clic_processors(unet) or install_processors(unet, train_kv=False, processor_class=processor_class)
        for key, value in self.attn_weights.items():
            layer, sub, param = split_weight_key(key)
            if layer not in procs or sub not in procs[layer].trained_linears():
                raise ConceptFileError(f"{name}: layer {layer}.{sub} does not exist in {backbone.model_id}")
            target = getattr(procs[layer].trained_linears()[sub], param)
            if target.shape != value.shape:
                raise ConceptFileError(f"{name}: {layer}.{sub}.{param} has shape {tuple(value.shape)}, "
                                       f"the model needs {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value)
        for proc in procs.values():
            proc.requires_grad_(train in ("kv", "kv+q+out"))
        return procs


# ---------------------------------------------------------------------------------------------- applying


@dataclass
class AppliedConcept:
    """A concept installed on a backbone (inside :func:`applied_concept`)."""

    token_ids: list[int]
    embeddings: list[ConceptTokenEmbedding]             # each text encoder's; their last rows are the concept's tokens
    processors: dict[str, ClicCrossAttnProcessor]       # the cross-attention processors
    base_processors: dict                               # the processors found, trained copies made plain

    @property
    def token_rows(self) -> torch.Tensor:
        """The concept tokens' embeddings ``(n_tokens, dim)`` when they were added last, as for learning (each text
        encoder's trainable rows side by side)."""
        return torch.cat([emb.new[-len(self.token_ids):] for emb in self.embeddings], -1)

    @property
    def token_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable embedding rows, one parameter per text encoder."""
        return [emb.new for emb in self.embeddings]

    @property
    def attention_parameters(self) -> list[torch.nn.Parameter]:
        return [p for proc in self.processors.values() for p in proc.parameters()]


def base_processors(processors: dict) -> dict:
    """The base model's processors: our processors with trained copies become plain ones (base weights, still able
    to capture maps); any other processor (the stock ones of a fresh backbone) is kept."""
    out = {}
    for name, proc in processors.items():
        if isinstance(proc, ClicCrossAttnProcessor) and proc.trained_linears():
            plain = type(proc)()
            plain.name = name
            proc = plain
        out[name] = proc
    return out


@contextlib.contextmanager
def restored_model(backbone) -> Iterator[None]:
    """Whatever the body does to the backbone's tokens, processors and ``requires_grad`` flags, they are as they were
    afterwards."""
    modules = backbone.modules
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    with restored_vocabulary(backbone), restored_processors(backbone.unet):
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


@contextlib.contextmanager
def applied_concept(backbone, concept: Concept, train: str | None = None, train_token: bool = False,
                    name: str = "concept", processor_class: type[ClicCrossAttnProcessor] = ClicCrossAttnProcessor
                    ) -> Iterator[AppliedConcept]:
    """Apply ``concept`` to ``backbone`` (:meth:`Concept.apply`) for the body; afterwards the backbone is as it was:
    same vocabulary, embedding rows, attention processors and ``requires_grad`` flags. Nothing else has to be
    reloaded to get the base model back.

    ``train`` and ``train_token`` make the cross-attention copies and the token rows trainable (learning).
    """
    with restored_model(backbone):
        found = dict(backbone.unet.attn_processors)
        procs = concept.apply(backbone, name, train=train, processor_class=processor_class)
        embeddings = concept_embeddings(backbone)
        for embedding in embeddings:
            embedding.new.requires_grad_(train is not None and train_token)
        ids = backbone.tokenizer.convert_tokens_to_ids(list(concept.tokens))
        yield AppliedConcept(ids, embeddings, procs, base_processors(found))


def split_weight_key(key: str) -> tuple[str, str, str]:
    """``attn.<layer>.<to_k|to_v|to_q|to_out.0>.<weight|bias>`` -> (layer, module, param)."""
    body, param = key[len("attn."):].rsplit(".", 1)
    if body.endswith(".to_out.0"):
        return body[: -len(".to_out.0")], "to_out.0", param
    layer, module = body.rsplit(".", 1)
    return layer, module, param
