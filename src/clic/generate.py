"""Generation with a learned concept (paper sec. 4.1, "Generation"): two-stage sampling.

    steps 0 .. t_s-1 : the base UNet (the concept's processors swapped out) with "a photo of an OBJECT"
    steps t_s .. N-1 : the concept's UNet with "a photo of an OBJECT, with <v*> style"

The base stage lays out a realistic object; the tuned stage then adds the concept's details. t_s = 0 is plain
text-to-image sampling with the concept (equal to a stock ``StableDiffusionPipeline`` with the exported concept
loaded, see the tests); t_s = N gives the base model's image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .attention import swapped_processors
from .checks import FiniteWatch
from .concept import applied_concept
from .config import GenerateConfig
from .sampling import (DeviceDDIM, check_prompt, decode_batches, denoise, denoise_captured, encode_prompt,
                       sampling_speedups, seed_batches)

log = logging.getLogger(__name__)

GUIDANCE_HINT = "try a smaller --guidance-scale"


def with_article(obj: str) -> str:
    """'chair' -> 'a chair', 'ornament' -> 'an ornament'; kept as it is if it already starts with an article."""
    obj = obj.strip()
    if obj.split(" ", 1)[0].lower() in ("a", "an", "the"):
        return obj
    return f"{'an' if obj[:1].lower() in 'aeiou' else 'a'} {obj}"


def fill_prompt(template: str, object_class: str, tokens: list[str]) -> str:
    return template.replace("{object}", with_article(object_class)).replace("{token}", " and ".join(tokens))


@dataclass
class GenerateResult:
    images: torch.Tensor     # (N, 3, R, R) in [-1, 1], one per seed
    latents: torch.Tensor    # (N, C, h, w) final latents
    seeds: list[int]
    prompt: str
    base_prompt: str
    base_steps: int


@torch.no_grad()
def generate(backbone, concept, cfg: GenerateConfig | None = None, progress: bool = True,
             callback: Callable[[dict], None] | None = None) -> GenerateResult:
    """Generate images of an object carrying ``concept``, one per seed (two-stage sampling, paper sec. 4.1).

    The concept is applied for the call; the backbone is as it was afterwards. ``callback`` is called
    after every step with ``step``, ``timestep``, ``stage`` ("base" or "concept"), ``seeds`` and ``latents``.
    """
    cfg = cfg or GenerateConfig()

    # 1. Check inputs
    cfg.check()
    seeds = cfg.seed_list()
    object_class = cfg.object_class or concept.meta.get("object_class") or "object"
    prompt = fill_prompt(cfg.prompt, object_class, concept.tokens)
    base_prompt = fill_prompt(cfg.base_prompt, object_class, concept.tokens)
    check_prompt(prompt, concept.tokens)

    with applied_concept(backbone, concept) as applied, sampling_speedups(backbone, cfg):
        # the base stage runs the same (fused) self-attention: only the cross-attention is the base model's
        base_procs = {**applied.base_processors,
                      **{n: p for n, p in backbone.unet.attn_processors.items() if ".attn1." in n}}
        # 2. Encode both prompts
        text = encode_prompt(backbone, prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        base_text = encode_prompt(backbone, base_prompt, cfg.negative_prompt, 1, cfg.do_cfg)

        latents = []
        # 3. Prepare latents (per batch of seeds)
        for b in seed_batches(backbone, cfg, seeds, "generate", progress):
            # 4. Denoising loop: the base stage with the concept's processors swapped out, then the concept stage
            x, batch = b.latents, len(b.seeds)
            watch = FiniteWatch("the generated latents", GUIDANCE_HINT)
            ddim = DeviceDDIM(b.scheduler, cfg.ddim_eta, backbone.device) if cfg.cuda_graphs == "capture" else None

            def stage(x, steps, text, info):
                """A stage's steps: the plain loop, or (--cuda-graphs capture) the step recorded as a CUDA graph."""
                if ddim is not None:
                    return denoise_captured(backbone, b.scheduler, ddim, x, steps, text, cfg, b.generators, b.bar,
                                            callback, info, watch)
                return denoise(backbone, b.scheduler, x, steps, text, cfg, b.extra, b.bar, callback, info,
                               watch=watch)[0]

            if cfg.t_s:
                with swapped_processors(backbone.unet, base_procs):
                    x = stage(x, range(cfg.t_s), base_text.repeat_interleave(batch),
                              {"stage": "base", "seeds": b.seeds})
            x = stage(x, range(cfg.t_s, cfg.steps), text.repeat_interleave(batch),
                      {"stage": "concept", "seeds": b.seeds})
            watch.check()
            latents.append(x)
        latents = torch.cat(latents)

        # 5. Decode
        images = decode_batches(backbone, latents, cfg.batch_size)
    return GenerateResult(images.cpu(), latents.cpu(), seeds, prompt, base_prompt, cfg.t_s)
