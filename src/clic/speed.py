"""Speed and memory levers of the learning loop (``LearnConfig``'s options; ``clic bench --levers`` measures each).

:func:`speed_levers` turns the chosen ones on around the loop and leaves the UNet as it found it:

- gradient checkpointing (diffusers' non-reentrant checkpoint of every block): less memory, slower;
- channels-last weights and inputs;
- ``torch.compile`` of the whole UNet (one graph: the longest compile), or of its repeated blocks only
  (:func:`compiled_blocks`: every ResNet and transformer block compiled in place, the glue between them eager;
  blocks of one kind share compiled code, so the compile is shorter);
- cuDNN's benchmark mode (each convolution shape timed once for its fastest algorithm).

None of them changes what is computed: the losses agree with the plain loop up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: the UNet's repeated blocks (diffusers class names) that ``compile_blocks`` compiles one by one
BLOCK_TYPES = ("ResnetBlock2D", "Transformer2DModel")


@contextmanager
def compiled_blocks(unet, recompile_limit: int = 64) -> Iterator[list]:
    """Compile every block of :data:`BLOCK_TYPES` in place (``nn.Module.compile``: names, parameters and
    processors unchanged); the blocks run eager again on exit.

    Blocks of one class differ in channels and resolution: Dynamo compiles a block's code once per distinct
    structure and shape (dynamic after the first shape change), so the per-code recompile limit is raised
    for the duration (SD1.x has ~10 ResNet structures)."""
    blocks = [m for m in unet.modules() if type(m).__name__ in BLOCK_TYPES]
    config = torch._dynamo.config
    saved_limit = config.recompile_limit
    config.recompile_limit = max(saved_limit, recompile_limit)
    try:
        for block in blocks:
            block.compile(dynamic=False)
        yield blocks
    finally:
        for block in blocks:
            block._compiled_call_impl = None       # what nn.Module.compile set; None: the eager forward again
        config.recompile_limit = saved_limit


@contextmanager
def speed_levers(unet, cfg) -> Iterator:
    """The UNet as the learning loop calls it, with ``cfg``'s (a ``LearnConfig``) levers on; left as found."""
    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    benchmark = torch.backends.cudnn.benchmark
    try:
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        if cfg.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if cfg.compile_blocks:
            with compiled_blocks(unet):
                yield unet
        else:
            yield torch.compile(unet) if cfg.compile_unet else unet
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if cfg.gradient_checkpointing and not checkpointing:
            unet.disable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.contiguous_format)
