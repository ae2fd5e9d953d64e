"""Speed and memory levers of the learning loop (``LearnConfig``'s options; ``clic bench --levers`` measures each).

:func:`speed_levers` turns the chosen ones on around the loop and leaves the UNet as it found it:

- gradient checkpointing (diffusers' non-reentrant checkpoint of every block): less memory, slower;
- channels-last weights and inputs;
- ``torch.compile`` of the UNet, in one of its modes: ``reduce-overhead`` replays the compiled step as CUDA
  graphs, which removes the per-kernel launch cost of the host (BENCHMARKS.md: on the H200 the eager step is
  bound by the host, not the GPU).

None of them changes what is computed: the losses agree with the plain loop up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: ``torch.compile`` modes offered by ``--compile-mode``
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@contextmanager
def speed_levers(unet, cfg) -> Iterator:
    """The UNet as the learning loop calls it, with ``cfg``'s (a ``LearnConfig``) levers on; left as found."""
    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    try:
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        yield torch.compile(unet, mode=cfg.compile_mode) if cfg.compile_unet else unet
    finally:
        if cfg.gradient_checkpointing and not checkpointing:
            unet.disable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.contiguous_format)


def mark_step(cfg) -> None:
    """Before each learning step: under CUDA graphs, tell torch that the last step's graph outputs are done with
    (a new iteration may overwrite them)."""
    if cfg.compile_unet and cfg.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
