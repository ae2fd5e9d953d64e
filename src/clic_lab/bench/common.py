"""What the bench's measurements share: device syncs and peaks, the inputs, and the learning run (fast or
reference path) of a config."""

from __future__ import annotations

import resource

import torch

from clic.builder import SPECS, build_pipeline
from clic.config import LearnConfig, learn_config
from clic.learn import learn
from clic.models import backbone_from_pipeline, load_backbone, parse_dtype, pick_device

from .reference import learn_reference

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def load_bench_backbone(model: str, device=None, dtype="fp32"):
    """A backbone for timing: a kind of :data:`clic.builder.SPECS` built in memory (random weights), or a model
    folder / hub id through :func:`clic.models.load_backbone`. ``device="meta"``: the kind's weights are made on the
    meta device, shapes without values (for counting FLOPs and memory: :mod:`.counting`), in seconds and without
    the memory the weights would take (SDXL's 3.5 B parameters: 14 GB in fp32). On a GPU the weights are made there
    (random init of SDXL on the host takes minutes; their values differ from the CPU's, which timing does not mind)."""
    if model in SPECS:
        device = torch.device("meta") if device == "meta" else pick_device(device)
        pipe = build_pipeline(model, device=device if device.type in ("meta", "cuda") else None)
        return backbone_from_pipeline(model, pipe, device, parse_dtype(dtype))
    return load_backbone(model, device, dtype)


def bench_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image (random pixels) and mask (a box) every measurement learns from."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(1, size, size)
    mask[:, size // 8: size // 2, size // 4: 3 * size // 4] = 1
    return image, mask


def learning_config(steps: int, **cfg) -> tuple[LearnConfig, bool]:
    """(the bench's learning config: ``cfg``'s LearnConfig overrides on a chair, no checkpoints; whether ``cfg``
    asks for the reference path, ``reference_path=True``)."""
    reference = bool(cfg.pop("reference_path", False))
    return learn_config(steps=steps, object_class="chair", checkpoint_every=0, **cfg), reference


def run_learning(backbone, config: LearnConfig, reference: bool = False, **kwargs):
    """One learning run on the bench's image and mask: :func:`clic.learn.learn`, or the reference path."""
    image, mask = bench_inputs(backbone.resolution)
    return (learn_reference if reference else learn)(backbone, [image], [mask], config, progress=False, **kwargs)
