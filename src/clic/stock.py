"""A concept in a *stock* diffusers pipeline: :func:`load_concept`, and the export folder for users of diffusers only.

A concept is two things a stock ``StableDiffusionPipeline`` (or its Img2Img and Inpaint siblings, or SDXL's
``StableDiffusionXLPipeline`` and its siblings) already knows how to hold, so nothing of clic has to stay in the
pipeline:

- its tokens (v*, or <v1*>, <v2*>, ...): textual-inversion embeddings, added by ``pipe.load_textual_inversion``
  (SDXL: into both text encoders, each its part of the token's rows; the second encoder pools at its end-of-text
  token, :func:`clic.models.fix_pooled_eos`, as clic's SDXL backbone does);
- its trained cross-attention weights (K/V, or K/V/Q/out): diffusers' own ``CustomDiffusionAttnProcessor2_0``
  processors, installed with ``pipe.unet.set_attn_processor``.

Why not ``pipe.unet.load_attn_procs``, the loader diffusers documents for Custom Diffusion: in diffusers 0.42 it reads
the file, builds the processors and installs them only when its private ``_pipeline`` argument is given, so the
documented call returns without error and without the trained K/V: the image is the token-only one.

The export folder (:func:`export_diffusers`) holds what both routes read::

    pytorch_custom_diffusion_weights.safetensors   the processors' weights, in ``unet.save_attn_procs``'s layout
    learned_embeds.safetensors                     {token: embedding}, one token; with several tokens one file each,
    learned_embeds_1.safetensors, ...              (``load_textual_inversion`` takes one token per file)
    clic_concept.json                              the concept's metadata (base model, prompt, tokens, files)

SDXL's export holds the embeddings in the layout SDXL embeddings are shared in: one ``learned_embeds.safetensors``
with ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` (each text encoder's rows, the n tokens in its metadata,
``"tokens"``: a JSON list).

:func:`load_concept` takes a concept file or such a folder. With the ``ddim`` sampler (``clip_sample=False``) and no
base-model stage (``clic generate --base-steps 0``), a stock pipeline with the concept loaded gives the image of
:func:`clic.generate.generate` (tests/test_stock.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, CustomDiffusionAttnProcessor2_0
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .concept import Concept, split_weight_key
from .errors import ConceptFileError
from .fileio import staged_folder
from .models import Backbone
from .tokens import split_rows

WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
EMBEDS = "learned_embeds.safetensors"
META = "clic_concept.json"

#: clic's trained module -> the attribute of diffusers' CustomDiffusionAttnProcessor2_0 that holds it
MODULES = {"to_k": "to_k_custom_diffusion", "to_v": "to_v_custom_diffusion", "to_q": "to_q_custom_diffusion",
           "to_out.0": "to_out_custom_diffusion.0"}


# ---------------------------------------------------------------------------------------------- stock pipelines


def load_concept(pipe, concept, check_base: bool = True) -> list[str]:
    """Apply ``concept`` to a stock diffusers pipeline, for good: its tokens become textual-inversion tokens of
    ``pipe`` and its trained cross-attention layers get ``CustomDiffusionAttnProcessor2_0`` processors with its
    weights (in the UNet's device and dtype). Works for any number of tokens, K/V or K/V/Q/out concepts, and every
    pipeline with ``tokenizer``, ``text_encoder`` and ``unet`` components (``StableDiffusionPipeline``,
    ``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline`` built on the same model, ...), and SDXL's
    with ``tokenizer_2`` and ``text_encoder_2`` too (``StableDiffusionXLPipeline`` and its siblings: the tokens go
    into both text encoders, the second one set to pool at its end-of-text token).

    Args:
        pipe: the pipeline.
        concept: a :class:`clic.concept.Concept`, a concept file made by ``clic learn``, or a folder made by
            :func:`export_diffusers`.
        check_base: refuse a concept made for another base model (as clic's own commands do).

    Returns the concept's tokens, e.g. ``["<v*>"]``: put them in the prompt. :func:`unload_concept` takes it out.
    """
    concept, name = read_concept(concept)
    backbone = Backbone.of_pipeline(pipe)        # SDXL: also makes the second encoder pool at the end-of-text token
    if check_base:
        concept.check_base(backbone, name)
    known = [t for t in concept.tokens if any(t in tokenizer.get_vocab() for tokenizer in backbone.tokenizers)]
    if known:
        raise ConceptFileError(f"{name}: the pipeline already has the token(s) {', '.join(known)} (a concept loaded "
                               "before?): clic.stock.unload_concept(pipe) takes it out")
    rows = split_rows(backbone, concept.embeddings)
    processors = custom_diffusion_processors(pipe.unet, concept, name)
    for vectors, encoder, tokenizer in zip(rows, backbone.text_encoders, backbone.tokenizers):
        pipe.load_textual_inversion(list(vectors), token=list(concept.tokens), text_encoder=encoder,
                                    tokenizer=tokenizer)
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, **processors})
    return list(concept.tokens)


def unload_concept(pipe, tokens: list[str] | None = None) -> None:
    """Take a concept out of a stock pipeline again: its tokens (``tokens``, default every textual-inversion token)
    and every Custom Diffusion processor (back to plain SDPA attention)."""
    pipe.unload_textual_inversion(tokens)
    if getattr(pipe, "text_encoder_2", None) is not None:                                  # SDXL's second encoder
        pipe.unload_textual_inversion(tokens, tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
    procs = pipe.unet.attn_processors
    pipe.unet.set_attn_processor({name: AttnProcessor2_0() if isinstance(proc, CustomDiffusionAttnProcessor2_0)
                                  else proc for name, proc in procs.items()})


def custom_diffusion_processors(unet, concept: Concept, name: str = "concept") -> dict:
    """``{layer: CustomDiffusionAttnProcessor2_0}`` holding the concept's weights, for the layers it has weights for
    (the others keep their processors), in the UNet's device and dtype. Refuses weights of a layer the UNet does not
    have, of another shape, or that diffusers' processor cannot hold (a bias on K, V or Q)."""
    layers = export_state_dict(concept, unet.attn_processors, name)
    out = {}
    for layer, weights in layers.items():
        if not weights:
            continue
        hidden, cross = weights["to_k_custom_diffusion.weight"].shape
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in weights,
                                               hidden_size=hidden, cross_attention_dim=cross)
        try:
            proc.load_state_dict(weights)
        except RuntimeError as exc:
            raise ConceptFileError(f"{name}: the weights of {layer} do not fit diffusers' Custom Diffusion processor "
                                   f"({str(exc).splitlines()[0]})") from exc
        out[layer] = proc.to(unet.device, unet.dtype)
    return out


# ---------------------------------------------------------------------------------------------- the export folder


def export_state_dict(concept: Concept, processors, name: str = "concept") -> dict[str, dict[str, torch.Tensor]]:
    """The concept's weights per attention layer of a UNet whose processors are ``processors`` (keys of
    ``unet.attn_processors``), named as diffusers' Custom Diffusion processors name them; ``{}`` for a layer the
    concept has no weights for."""
    layers = {layer: {} for layer in processors}
    for key, value in concept.attn_weights.items():
        layer, module, param = split_weight_key(key)
        if layer not in layers:
            raise ConceptFileError(f"{name}: the model has no attention layer {layer}")
        if param == "bias" and module != "to_out.0":
            raise ConceptFileError(f"{name}: {layer}.{module} has a bias, which diffusers' Custom Diffusion "
                                   "processor cannot hold")
        layers[layer][f"{MODULES[module]}.{param}"] = value.float().contiguous()
    for layer, weights in layers.items():
        if weights and {"to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight"} - set(weights):
            raise ConceptFileError(f"{name}: {layer} has trained weights but not both K and V")
    return layers


def export_diffusers(concept, out_dir, backbone=None) -> Path:
    """Write ``concept`` (a :class:`clic.concept.Concept` or a concept file) as the files a stock diffusers pipeline
    loads (see the module docstring): with diffusers only (README, "In a stock diffusers pipeline"), with
    :func:`load_concept`, or with diffusers' ``load_attn_procs``/``load_textual_inversion`` pair.

    ``backbone`` (optional) is checked to be the concept's base model; the layer names come from it when given, else
    from the concept (the self-attention entries of ``save_attn_procs``'s layout are then left out). The embeddings
    are in SDXL's layout when the concept's base model has two text encoders (its ``backbone``, or the sizes the
    concept file records: ``embedding_dims``). The files are
    written into a temporary folder and moved into place together (a full disk leaves the folder as it was); the
    embedding files of an earlier export to the same folder that this one does not write are removed. Returns the
    folder."""
    concept, name = read_concept(concept)
    if backbone is not None:
        concept.check_base(backbone, name)
        processors = list(backbone.unet.attn_processors)
    else:
        processors = concept.layers
    state = {}
    for layer, weights in export_state_dict(concept, processors, name).items():
        if not weights:
            state[layer] = torch.zeros(0)        # save_attn_procs's entry for a layer without trained weights
        state.update({f"{layer}.{key}": value for key, value in weights.items()})
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConceptFileError(f"{out}: exists and is not a folder")
    dims = backbone.embedding_dims if backbone is not None else concept.meta.get("embedding_dims")
    sdxl = dims is not None and len(dims) == 2
    files = embedding_files(concept.tokens, sdxl)
    with staged_folder(out) as tmp:          # every file of the export, or none of them (e.g. on a full disk)
        _save(state, tmp / WEIGHTS)
        if sdxl:
            clip_l, clip_g = concept.embeddings.float().split(list(dims), dim=-1)
            _save({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, tmp / EMBEDS,
                  tokens=json.dumps(list(concept.tokens)))
        else:
            for token, vector, file in zip(concept.tokens, concept.embeddings, files):
                _save({token: vector.float().contiguous()}, tmp / file)
        meta = {**concept.meta, "tokens": list(concept.tokens), "embedding_files": files, "weights_file": WEIGHTS}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    for old in out.glob("learned_embeds*.safetensors"):    # a previous export's other tokens would be loaded along
        if old.name not in files:
            old.unlink()
    return out


def embedding_files(tokens: list[str], sdxl: bool = False) -> list[str]:
    """``learned_embeds.safetensors`` for one token, or for any number of tokens in SDXL's layout;
    ``learned_embeds_<k>.safetensors`` (k from 1) for several."""
    if len(tokens) == 1 or sdxl:
        return [EMBEDS]
    return [f"learned_embeds_{k}.safetensors" for k in range(1, len(tokens) + 1)]


def read_export(folder) -> Concept:
    """The concept of a folder written by :func:`export_diffusers` (also one whose ``learned_embeds.safetensors``
    holds several tokens, as earlier versions wrote; or SDXL's ``clip_l`` / ``clip_g`` layout)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
        state = load_file(str(folder / WEIGHTS))
        embeds = {}
        for file in meta.get("embedding_files") or [EMBEDS]:
            embeds.update(load_file(str(folder / file)))
        if set(embeds) == {"clip_l", "clip_g"}:                 # SDXL's layout: each token's rows side by side
            with safe_open(str(folder / EMBEDS), framework="pt") as f:
                xl_tokens = json.loads((f.metadata() or {})["tokens"])
            embeds = dict(zip(xl_tokens, torch.cat([embeds["clip_l"], embeds["clip_g"]], -1)))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ConceptFileError(f"{folder}: not a folder written by `clic export-diffusers` "
                               f"({str(exc).splitlines()[0]})") from exc
    tokens = list(meta.get("tokens") or embeds)
    if set(tokens) != set(embeds):
        raise ConceptFileError(f"{folder}: the embeddings ({', '.join(embeds)}) are not the tokens {tokens}")
    back = {v: k for k, v in MODULES.items()}
    weights = {}
    for key, value in state.items():
        if value.numel() == 0:
            continue
        body, param = key.rsplit(".", 1)
        for theirs, ours in back.items():
            if body.endswith("." + theirs):
                weights[f"attn.{body[: -len(theirs) - 1]}.{ours}.{param}"] = value.float()
                break
        else:
            raise ConceptFileError(f"{folder}: unexpected entry {key} in {WEIGHTS}")
    vectors = torch.stack([embeds[t].float().reshape(-1) for t in tokens])
    return Concept(tokens, vectors, weights, {k: v for k, v in meta.items() if k not in ("embedding_files",
                                                                                         "weights_file")})


def read_concept(concept) -> tuple[Concept, str]:
    """``(concept, name for messages)`` of a :class:`Concept`, a concept file or an export folder."""
    if isinstance(concept, Concept):
        return concept, "concept"
    if isinstance(concept, (str, os.PathLike)) and Path(concept).is_dir():
        return read_export(concept), str(concept)
    return Concept.load(concept), str(concept)


def _save(tensors: dict, path: Path, **metadata: str) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
