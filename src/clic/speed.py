"""Speed and memory levers of the learning loop (``LearnConfig``'s speed options; ``clic bench --levers`` measures
each, BENCHMARKS.md has the numbers).

:func:`speed_levers` turns the chosen ones on around the loop and leaves the models as it found them:

- gradient checkpointing (diffusers' non-reentrant checkpoint of every block): less memory, slower;
- channels-last weights and inputs;
- ``torch.compile`` of the UNet (``--compile-unet``) and of the text encoder's transformer layers
  (``--compile-text``: the text is encoded, forward and backward, every step while the token trains; a fifth of the
  step's kernels on SD1.4), in one of its modes (``--compile-mode``): ``reduce-overhead`` replays the compiled graphs
  as CUDA graphs, which removes the per-kernel launch cost of the host (on a fast GPU the eager step is bound by the
  host, not the GPU); ``cudagraphs`` replays torch's own kernels as CUDA graphs without generating new
  ones (torch's ``cudagraphs`` backend: the model is traced, not compiled, so it is ready in seconds instead of
  minutes). Only the text encoder's layers are compiled, not its embedding: each learning run adds a
  token row to the embedding table, and a graph holding the table would compile again for every run of a process.

None of them changes what is computed: the losses agree with the plain loop up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0

#: ``torch.compile`` modes offered by ``--compile-mode`` (``cudagraphs``: the backend of that name, no Inductor)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "cudagraphs")
#: the modes that replay CUDA graphs (without a GPU they run as plain compiled, resp. traced, code)
CUDA_GRAPH_MODES = ("reduce-overhead", "cudagraphs")
#: learning steps between reads of the loss values on a GPU (``--sync-every 0``; on the CPU it is 1)
GPU_SYNC_EVERY = 10
#: ``--cuda-graphs`` values (``auto``: on for a CUDA device, see :func:`with_cuda_graphs`; ``capture``: the whole
#: learning step, update included, recorded as one CUDA graph, see :mod:`clic.capture`)
CUDA_GRAPHS = ("auto", "on", "off", "capture")
#: ``--cuda-graphs`` values of transfer and generation (``capture``: each denoising step recorded as a CUDA graph,
#: see :class:`clic.sampling.DeviceDDIM` and :mod:`clic.capture`)
SAMPLING_GRAPHS = ("off", "capture")
#: what ``--cuda-graphs on`` sets: the UNet and the text encoder's layers traced by torch's ``cudagraphs`` backend and
#: replayed as CUDA graphs, the UNet channels-last (of the levers ready in seconds, the fastest measured: BENCHMARKS.md)
GRAPH_OPTIONS = {"compile_unet": True, "compile_text": True, "compile_mode": "cudagraphs", "channels_last": True}


def compiled(fn, mode: str = "default"):
    """``torch.compile(fn)`` in one of :data:`COMPILE_MODES`."""
    if mode == "cudagraphs":
        return torch.compile(fn, backend="cudagraphs")
    return torch.compile(fn, mode=mode)


def text_layers(text_encoder) -> torch.nn.Module:
    """The transformer layers of a CLIP text encoder (``CLIPEncoder``; transformers 4 nests it in ``text_model``)."""
    return getattr(text_encoder, "text_model", text_encoder).encoder


def compiles(cfg) -> bool:
    return cfg.compile_unet or getattr(cfg, "compile_text", False)


def sets_graph_options(cfg) -> bool:
    """Whether ``cfg`` (a ``LearnConfig``) sets any of :data:`GRAPH_OPTIONS` itself."""
    return compiles(cfg) or cfg.channels_last or cfg.compile_mode != "default"


def with_cuda_graphs(cfg, device):
    """``cfg`` with ``--cuda-graphs`` resolved for ``device``: ``on`` sets :data:`GRAPH_OPTIONS`; ``auto`` does so on
    a CUDA device unless the run saves memory (``--gradient-checkpointing``: the graphs raise the peak, see
    BENCHMARKS.md) or sets a compile or memory-format option itself; ``off``, and ``auto`` elsewhere, leave ``cfg``
    as it is. The result says ``on`` or ``off``; ``capture`` stays ``capture`` and sets channels-last (with the host
    out of the loop, cuDNN's layout conversions around each bf16 convolution were a fifth of the GPU's time)."""
    if cfg.cuda_graphs == "capture":
        return dataclasses.replace(cfg, channels_last=True)
    wanted = cfg.cuda_graphs == "on" or (
        cfg.cuda_graphs == "auto" and torch.device(device).type == "cuda" and not cfg.gradient_checkpointing
        and not sets_graph_options(cfg))
    if not wanted:
        return dataclasses.replace(cfg, cuda_graphs="off")
    return dataclasses.replace(cfg, cuda_graphs="on", **GRAPH_OPTIONS)


def sync_interval(cfg, device) -> int:
    """``cfg.sync_every`` resolved for ``device``: the learning steps between reads of the loss values."""
    return cfg.sync_every or (1 if torch.device(device).type == "cpu" else GPU_SYNC_EVERY)


@contextmanager
def compiled_forward(module: torch.nn.Module, mode: str = "default", enabled: bool = True) -> Iterator[None]:
    """Calls of ``module`` run ``torch.compile``'s version of its forward while inside; the module itself stays what
    it was (its names, processors and state dict are untouched): an instance attribute shadows the class's forward
    until the exit."""
    if not enabled:
        yield
        return
    shadowed = vars(module).get("forward")        # an outer compiled_forward's, put back on exit
    module.forward = compiled(module.forward, mode)
    try:
        yield
    finally:
        if shadowed is None:
            del module.forward
        else:
            module.forward = shadowed


@contextmanager
def fused_self_attention(unet, enabled: bool = True) -> Iterator[None]:
    """While inside, every self-attention layer of ``unet`` projects Q, K and V with one matmul (diffusers'
    ``Attention.fuse_projections`` and ``FusedAttnProcessor2_0``): two matmuls fewer a layer in the forward pass and
    in the backward one, the same numbers up to float rounding. The unfused projections stay (the fused copy is ~2%
    of the UNet's weights while inside); on exit the processors are put back and the copy dropped."""
    if not enabled:
        yield
        return
    saved = dict(unet.attn_processors)
    layers = [unet.get_submodule(name.removesuffix(".processor")) for name in saved if ".attn1." in name]
    try:
        for attn in layers:
            attn.fuse_projections()
            attn.to_qkv.requires_grad_(False)        # a new nn.Linear: frozen like the weights it copies
        unet.set_attn_processor({**saved, **{name: FusedAttnProcessor2_0() for name in saved if ".attn1." in name}})
        yield
    finally:
        unet.set_attn_processor(saved)
        for attn in layers:
            attn.fused_projections = False
            if hasattr(attn, "to_qkv"):
                del attn.to_qkv


@contextmanager
def speed_levers(backbone, cfg) -> Iterator[None]:
    """``cfg``'s (a ``LearnConfig``) levers on the UNet and text encoder while inside, and self-attention's Q/K/V as
    one matmul (:func:`fused_self_attention`); the models are left as found."""
    unet = backbone.unet
    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    try:
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        with fused_self_attention(unet), compiled_forward(unet, cfg.compile_mode, cfg.compile_unet), \
                contextlib.ExitStack() as stack:
            for encoder in backbone.text_encoders:          # SDXL: both text encoders
                stack.enter_context(compiled_forward(text_layers(encoder), cfg.compile_mode, cfg.compile_text))
            yield
    finally:
        if cfg.gradient_checkpointing and not checkpointing:
            unet.disable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.contiguous_format)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for it: a plain copy to a GPU waits until the GPU has run all the
    work queued before it (torch synchronizes the stream after copying from pageable memory); from pinned memory
    with ``non_blocking`` the host goes on at once (and the pinned block is not reused before the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def mark_step(cfg) -> None:
    """Before each learning or denoising step: under CUDA graphs, tell torch that the last step's graph outputs are
    done with (a new iteration may overwrite them)."""
    if compiles(cfg) and cfg.compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
