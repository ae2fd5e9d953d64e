"""Generation with a learned concept (paper sec. 4.1, "Generation"): two-stage sampling.

    steps 0 .. t_s-1 : the base UNet (the concept's processors swapped out) with "a photo of an OBJECT"
    steps t_s .. N-1 : the concept's UNet with "a photo of an OBJECT, with <v*> style"

The base stage lays out a realistic object; the tuned stage then adds the concept's details. t_s = 0 is plain
text-to-image sampling with the concept (equal to a stock ``StableDiffusionPipeline`` with the exported concept
loaded, see the tests); t_s = N gives the base model's image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .attention import swapped_processors
from .errors import InputError
from .sampling import (SamplingConfig, check_prompt, concept_applied, decode_batches, encode_prompt, opt, predict_noise,
                       host_timesteps, sampling_speedups, seed_batches)
from .speed import mark_step

log = logging.getLogger(__name__)

PAPER_T_S = 5  # of 50 steps (sec. 4.1)


@dataclass
class GenerateConfig(SamplingConfig):
    """Options of generation; defaults are the paper's (sec. 4.1)."""

    object_class: str | None = opt(None, "OBJECT to generate (default: the concept's object class)")
    prompt: str = opt("a photo of {object}, with {token} style",
                      "prompt of the concept stage; {object} becomes OBJECT with its article ('a chair'), {token} "
                      "the concept's token(s)")
    base_prompt: str = opt("a photo of {object}", "prompt of the base stage (paper: 'a photo of an OBJECT')")
    base_steps: int | None = opt(None, "t_s: the first t_s steps run the base UNet with the base prompt; 0: plain "
                                       "generation with the concept (default: the paper's 5 of 50, scaled with "
                                       "--steps)")
    batch_size: int = opt(4, "images per UNet batch (results do not depend on it beyond float rounding)")

    @property
    def t_s(self) -> int:
        return self.base_steps if self.base_steps is not None else round(PAPER_T_S * self.steps / 50)

    def check(self) -> None:
        self.check_sampling()
        if not 0 <= self.t_s <= self.steps:
            raise InputError(f"--base-steps {self.t_s} is outside the {self.steps}-step schedule (0..{self.steps})")


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

    The concept is applied for the call; the UNet's processors are restored afterwards. ``callback`` is called
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

    with concept_applied(backbone, concept) as (base_procs, _), sampling_speedups(backbone, cfg):
        # the base stage runs the same (fused) self-attention: only the cross-attention is the base model's
        base_procs = {**base_procs, **{n: p for n, p in backbone.unet.attn_processors.items() if ".attn1." in n}}
        # 2. Encode both prompts
        text = encode_prompt(backbone, prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        base_text = encode_prompt(backbone, base_prompt, cfg.negative_prompt, 1, cfg.do_cfg)

        latents = []
        # 3. Prepare latents (per batch of seeds)
        for b in seed_batches(backbone, cfg, seeds, "generate", progress):
            # 4. Denoising loop: the base stage with the concept's processors swapped out, then the concept stage
            x = b.latents
            base_steps = range(cfg.t_s)
            concept_steps = range(cfg.t_s, cfg.steps)
            if base_steps:
                with swapped_processors(backbone.unet, base_procs):
                    x = _denoise(backbone, b.scheduler, x, base_steps, base_text, cfg, b.extra, b.bar,
                                 callback, {"stage": "base", "seeds": b.seeds})
            x = _denoise(backbone, b.scheduler, x, concept_steps, text, cfg, b.extra, b.bar,
                         callback, {"stage": "concept", "seeds": b.seeds})
            latents.append(x)
        latents = torch.cat(latents)

        # 5. Decode
        images = decode_batches(backbone, latents, cfg.batch_size)
    return GenerateResult(images.cpu(), latents.cpu(), seeds, prompt, base_prompt, cfg.t_s)


def _denoise(backbone, scheduler, x: torch.Tensor, steps: range, text: torch.Tensor, cfg: GenerateConfig,
             extra: dict, bar, callback, info: dict) -> torch.Tensor:
    """Steps ``steps`` of the schedule with whatever processors are installed; ``text`` holds one row per prompt."""
    text = text.repeat_interleave(x.shape[0], 0)
    on_host = host_timesteps(scheduler)
    for i in steps:
        mark_step(cfg)
        noise_pred, _ = predict_noise(backbone, scheduler, x, scheduler.timesteps[i], text, cfg.guidance_scale)
        x = scheduler.step(noise_pred, on_host[i], x, **extra).prev_sample.float()
        bar.update(1)
        if callback is not None:
            callback({**info, "step": i, "timestep": int(on_host[i]), "latents": x})
    return x


# ---------------------------------------------------------------------------------------------- CLI


def cmd_generate(args) -> None:
    from .cli import dataclass_values
    from .concept import Concept
    from .imaging import grid, save_png, to_pil
    from .models import load_backbone

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    cfg = replace(GenerateConfig(), **dataclass_values(args, GenerateConfig))
    cfg.check()
    concept = Concept.load(args.concept)
    backbone = load_backbone(args.model or concept.meta["base_model"], args.device, args.dtype)
    concept.check_base(backbone, args.concept)

    result = generate(backbone, concept, cfg, progress=not args.quiet)

    files = {f"seed{seed}.png": to_pil(result.images[k]) for k, seed in enumerate(result.seeds)}
    rows = max(1, round(len(files) ** 0.5))
    files["grid.png"] = grid(list(files.values()), rows=rows, labels=[f"seed {s}" for s in result.seeds],
                             cell=max(128, backbone.resolution))
    for name, image in files.items():
        save_png(image, out_dir / name)
    print("\n".join(str(out_dir / name) for name in files))


def register_cli(subparsers, add_model_options) -> None:
    from .cli import add_dataclass_options

    p = subparsers.add_parser(
        "generate", help="generate new objects that carry a learned concept (paper sec. 4.1)",
        description="Two-stage sampling: the first t_s steps (--base-steps, default 5) with the base model and "
                    "'a photo of an OBJECT', the rest with the concept and 'a photo of an OBJECT, with <v*> style'.")
    p.add_argument("concept", help="concept file (.safetensors) made by `clic learn`")
    p.add_argument("--out", required=True, help="output folder: seed<S>.png per seed and grid.png")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    add_dataclass_options(p, GenerateConfig)
    p.set_defaults(func=cmd_generate)
