"""The concept file: one small safetensors file holding what was learned, and its diffusers export.

Layout (format ``clic-concept/1``):

- ``token_embeddings``: ``(n_tokens, dim)`` fp32, the learned v* rows (one per placeholder token);
- ``attn.<processor key>.<to_k|to_v|to_q|to_out.0>.<weight|bias>``: the trained cross-attention copies
  (full matrices, as Custom Diffusion stores them);
- metadata (strings, JSON): tokens, base model id, its architecture hash and weight statistics, prompt,
  object class, method, hyper-parameters, package version.

Loading checks the file is a clic concept and that it was made for the backbone it is applied to. Files are
never unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .attention import ClicCrossAttnProcessor, install_processors
from .errors import ConceptFileError
from .fileio import atomic_path
from .tokens import add_placeholders, concept_embedding

FORMAT = "clic-concept/1"
EXPORT_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
EXPORT_EMBEDS = "learned_embeds.safetensors"


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
            "base_weight_stats": backbone.weight_stats(), **meta,
        }
        return cls(list(tokens), embeddings.detach().float().cpu().clone(), weights, info)

    @property
    def trains_q_out(self) -> bool:
        return any(".to_q." in k for k in self.attn_weights)

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
        path = Path(path)
        if not path.is_file():
            raise ConceptFileError(f"{path}: concept file not found")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ConceptFileError(f"{path}: not a valid safetensors concept file ({str(exc).splitlines()[0]})") from exc
        try:
            meta = json.loads(metadata["clic"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ConceptFileError(f"{path}: safetensors file without clic concept metadata") from exc
        if meta.get("format") != FORMAT or "token_embeddings" not in tensors:
            raise ConceptFileError(f"{path}: unsupported concept format {meta.get('format')!r} (expected {FORMAT})")
        emb = tensors.pop("token_embeddings").float()
        if emb.shape[0] != len(meta["tokens"]):
            raise ConceptFileError(f"{path}: {emb.shape[0]} embeddings for {len(meta['tokens'])} tokens")
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
        if self.embeddings.shape[1] != backbone.text_encoder.config.hidden_size:
            raise ConceptFileError(f"{name}: embedding size {self.embeddings.shape[1]} does not fit the text encoder")

    def apply(self, backbone, name: str = "concept", explicit_softmax: bool = False) -> dict[str, ClicCrossAttnProcessor]:
        """Add the concept's tokens (or refresh their embeddings if added before) and install its cross-attention
        weights on ``backbone.unet``.

        Returns the installed processors; ``backbone.unet.attn_processors`` before the call is the base model.
        """
        self.check_base(backbone, name)
        parsed = [(_split_key(k), v) for k, v in self.attn_weights.items()]
        layers = sorted({layer for (layer, _, _), _ in parsed})
        emb = concept_embedding(backbone.text_encoder)
        if self.tokens and all(t in emb.tokens for t in self.tokens):
            # applied before in this process (learn(), an earlier apply()): same ids, new rows
            with torch.no_grad():
                for token, vector in zip(self.tokens, self.embeddings):
                    emb.new[emb.tokens.index(token)] = vector.to(emb.new.device)
        else:
            add_placeholders(backbone, self.tokens, self.embeddings.to(backbone.device))
        procs = install_processors(backbone.unet, train_kv=bool(layers), train_q_out=self.trains_q_out,
                                   layers=layers, explicit_softmax=explicit_softmax)
        for (layer, sub, param), value in parsed:
            if layer not in procs or sub not in procs[layer].trained_linears():
                raise ConceptFileError(f"{name}: layer {layer}.{sub} does not exist in {backbone.model_id}")
            target = getattr(procs[layer].trained_linears()[sub], param)
            if target.shape != value.shape:
                raise ConceptFileError(f"{name}: {layer}.{sub}.{param} has shape {tuple(value.shape)}, "
                                       f"the model needs {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value)
        for proc in procs.values():
            proc.requires_grad_(False)
        return procs


# ---------------------------------------------------------------------------------------------- export


def export_diffusers(concept: Concept, backbone, out_dir) -> Path:
    """Write the standard Custom Diffusion + textual inversion files a stock diffusers pipeline loads.

    - ``pytorch_custom_diffusion_weights.safetensors``: keys ``<processor key>.to_k_custom_diffusion.weight``
      etc. (self-attention layers as empty entries), the format of ``unet.save_attn_procs``;
    - ``learned_embeds.safetensors``: ``{token: embedding}`` for ``pipe.load_textual_inversion``.

    Loading (see :func:`load_exported`): ``pipe.load_textual_inversion(dir, weight_name=EXPORT_EMBEDS)`` and
    CustomDiffusionAttnProcessor2_0 processors set with ``unet.set_attn_processor`` (``unet.load_attn_procs``
    alone does not install them in recent diffusers, diffusers#9320).
    """
    concept.check_base(backbone)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name in backbone.unet.attn_processors:
        prefix = name
        layer_keys = {k: v for k, v in concept.attn_weights.items() if k.startswith(f"attn.{name}.")}
        if not layer_keys:
            sd[f"{prefix}"] = torch.zeros(0)  # an empty entry: stock processor for this layer
            continue
        for key, value in layer_keys.items():
            _, module, param = _split_key(key)
            mapped = {"to_k": "to_k_custom_diffusion", "to_v": "to_v_custom_diffusion", "to_q": "to_q_custom_diffusion",
                      "to_out.0": "to_out_custom_diffusion.0"}[module]
            sd[f"{prefix}.{mapped}.{param}"] = value.contiguous()
    _save_atomic(sd, out / EXPORT_WEIGHTS)
    _save_atomic({t: concept.embeddings[i].contiguous() for i, t in enumerate(concept.tokens)}, out / EXPORT_EMBEDS)
    (out / "clic_concept.json").write_text(json.dumps(concept.meta, indent=2, default=str))
    return out


def load_exported(pipe, export_dir) -> None:
    """Load exported files into a stock ``StableDiffusionPipeline`` with diffusers' own classes only."""
    from diffusers.models.attention_processor import AttnProcessor2_0, CustomDiffusionAttnProcessor2_0

    export_dir = Path(export_dir)
    state = load_file(str(export_dir / EXPORT_WEIGHTS))
    pipe.load_textual_inversion(str(export_dir), weight_name=EXPORT_EMBEDS)
    procs = {}
    for name in pipe.unet.attn_processors:
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if not sub:
            procs[name] = AttnProcessor2_0()
            continue
        hidden, cross = sub["to_k_custom_diffusion.weight"].shape
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in sub,
                                               hidden_size=hidden, cross_attention_dim=cross)
        proc.load_state_dict(sub)
        procs[name] = proc.to(pipe.unet.device, pipe.unet.dtype)
    pipe.unet.set_attn_processor(procs)


def _split_key(key: str) -> tuple[str, str, str]:
    """``attn.<layer>.<to_k|to_v|to_q|to_out.0>.<weight|bias>`` -> (layer, module, param)."""
    body, param = key[len("attn."):].rsplit(".", 1)
    if body.endswith(".to_out.0"):
        return body[: -len(".to_out.0")], "to_out.0", param
    layer, module = body.rsplit(".", 1)
    return layer, module, param


def _save_atomic(tensors: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
