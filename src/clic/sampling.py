"""Building blocks of the denoising loops of :mod:`clic.transfer` and :mod:`clic.generate`.

The loops themselves live next to their feature and read top to bottom in the diffusers-pipeline style; this
module holds what both need: the shared sampling options (:class:`SamplingConfig`), the scheduler, prompt
encoding, seeded initial noise, one classifier-free-guided UNet step, and :func:`concept_applied`, which
installs a concept for the duration of a call and hands back the base model's processors too (two-stage
generation swaps between them).

Randomness: every image has its own CPU ``torch.Generator`` seeded with its seed (as diffusers recommends), so
an image depends on its seed only, not on the device, the batch it ran in, or the other seeds.

``clic bench --sampling`` times transfer and generation (:mod:`clic.bench`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .attention import ClicCrossAttnProcessor, capture_token_maps, text_kv_cached
from .errors import InputError
from .speed import COMPILE_MODES, compiled_forward, fused_self_attention, to_device

log = logging.getLogger(__name__)

#: ``--scheduler`` names -> diffusers classes (first-order or multistep: one UNet call per step).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
}


def opt(default, help: str, **kw):
    """A dataclass field whose help text becomes its ``--option``'s help (:func:`clic.cli.add_dataclass_options`)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SamplingConfig:
    """Options every sampling command shares (transfer and generation)."""

    steps: int = opt(50, "denoising steps of the schedule (paper and official code: 50)")
    guidance_scale: float = opt(7.5, "classifier-free guidance scale (official code: 7.5; <= 1 switches CFG off)")
    scheduler: str = opt("ddim", "sampler: ddim (paper and official code), ddpm, euler, euler-ancestral, dpm-solver",
                         choices=tuple(SCHEDULERS))
    ddim_eta: float = opt(0.0, "DDIM's eta: 0 = deterministic DDIM (diffusers' default), 1 = as stochastic as DDPM "
                               "(official transfer script); ignored by the other schedulers")
    seeds: tuple[int, ...] = opt((0,), "one image per seed")
    num: int | None = opt(None, "number of images, seeds S, S+1, ... counted from the first --seeds value")
    negative_prompt: str = opt("", "prompt of the unconditional CFG branch")
    batch_size: int = opt(1, "images per UNet batch (results do not depend on it beyond float rounding)")
    compile_unet: bool = opt(False, "torch.compile the UNet (pays off over many steps or images: the first ones pay "
                                    "the compile time); same images up to float rounding")
    compile_mode: str = opt("default", "torch.compile mode of --compile-unet: cudagraphs replays torch's kernels as "
                                       "CUDA graphs (ready in seconds), reduce-overhead compiles and replays them",
                            choices=COMPILE_MODES)

    def seed_list(self) -> list[int]:
        if self.num is None:
            return [int(s) for s in self.seeds]
        if len(self.seeds) > 1:
            raise InputError("give either several --seeds or --num, not both")
        return [int(self.seeds[0]) + k for k in range(self.num)]

    def check_sampling(self) -> None:
        if self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        if self.ddim_eta < 0:
            raise InputError(f"--ddim-eta must be >= 0, got {self.ddim_eta}")
        if self.num is not None and self.num < 1:
            raise InputError(f"--num must be >= 1, got {self.num}")
        if not self.seeds:
            raise InputError("give at least one seed")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.compile_mode != "default" and not self.compile_unet:
            raise InputError(f"--compile-mode {self.compile_mode} needs --compile-unet")
        self.seed_list()

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


# ------------------------------------------------------------------------------------------------ scheduler


def make_scheduler(backbone, cfg: SamplingConfig):
    """A fresh scheduler (``from_config`` of the model's) with ``cfg.steps`` timesteps set on the backbone's device.

    v-prediction models (SD2) need nothing else: the config carries ``prediction_type`` and ``step`` uses it.
    ``clip_sample`` is off unless the model's config sets it (SD ships a PNDM config without the key, and DDIM's
    default would clip x_0 to [-1, 1]; the official CLiC code and diffusers' pipelines run without clipping).
    """
    import diffusers

    config = {"clip_sample": False, **backbone.scheduler_config}
    scheduler = getattr(diffusers, SCHEDULERS[cfg.scheduler]).from_config(config)
    scheduler.set_timesteps(cfg.steps, device=backbone.device)
    if len(scheduler.timesteps) != cfg.steps:  # e.g. PNDM's doubled step; refused rather than mis-indexed
        raise InputError(f"scheduler {cfg.scheduler} makes {len(scheduler.timesteps)} timesteps for {cfg.steps} steps")
    return scheduler


def host_timesteps(scheduler) -> torch.Tensor:
    """The schedule's timesteps on the host, for ``scheduler.step``: DDIM and DDPM index their CPU tables with the
    timestep and compare it with 0, which for a timestep on a GPU means a wait for the GPU at every step. (The UNet
    and ``add_noise`` take the timesteps on the device.)"""
    return scheduler.timesteps.cpu()


def step_kwargs(scheduler, generators: list[torch.Generator], eta: float) -> dict:
    """Extra arguments of ``scheduler.step`` (diffusers' ``prepare_extra_step_kwargs``): DDIM's eta and the
    per-image generators of stochastic samplers."""
    params = set(inspect.signature(scheduler.step).parameters)
    out = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generators if len(generators) > 1 else generators[0]
    return out


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(backbone, generators: list[torch.Generator], batch: int | None = None) -> torch.Tensor:
    """Gaussian ``(B, C, h, w)`` fp32 noise, row k from ``generators[k]`` (drawn on the CPU: same on every device)."""
    from diffusers.utils.torch_utils import randn_tensor

    n = batch or len(generators)
    shape = (n, backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    return randn_tensor(shape, generator=generators if len(generators) > 1 else generators[0],
                        device=backbone.device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ prompts


def check_prompt(prompt: str, tokens: Sequence[str]) -> list[str]:
    """The concept tokens that occur in ``prompt``; an :class:`InputError` if there is none."""
    found = [t for t in tokens if t in prompt]
    if not found:
        raise InputError(f"prompt {prompt!r} does not contain the concept's token "
                         f"{' or '.join(tokens)}")
    return found


@torch.no_grad()
def encode_prompt(backbone, prompt: str, negative_prompt: str, batch: int, cfg: bool) -> torch.Tensor:
    """Text embeddings for the UNet: ``(2B, L, D)``, [unconditional x B; conditional x B], with CFG, else ``(B, L, D)``.

    Same order and tokenisation (padded to the model length) as diffusers' pipelines.
    """
    cond = backbone.encode_text(backbone.tokenize(prompt)).to(backbone.unet.dtype).expand(batch, -1, -1)
    if not cfg:
        return cond
    uncond = backbone.encode_text(backbone.tokenize(negative_prompt)).to(backbone.unet.dtype).expand(batch, -1, -1)
    return torch.cat([uncond, cond])


def token_index(backbone, prompt: str, tokens: Sequence[str]) -> torch.Tensor:
    """``(1, T)`` positions of ``tokens`` in the tokenized ``prompt`` (found by tokenizing, on the host), on the
    backbone's device (where the capture uses them at every step)."""
    from .tokens import token_positions

    ids = backbone.tokenize(prompt, "cpu")
    return to_device(token_positions(ids, backbone.tokenizer.convert_tokens_to_ids(list(tokens)), prompt),
                     backbone.device)


# ------------------------------------------------------------------------------------------------ one step


def predict_noise(backbone, scheduler, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                  guidance_scale: float, capture_layers: Sequence[str] = (), index: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The classifier-free-guided model output for ``latents (B, C, h, w)`` at timestep ``t``.

    With ``capture_layers``, also CA(token, x_t) of the conditional rows, ``(B, T, h, w)`` fp32 (the tokens at
    ``index``). Runs under whatever grad mode the caller set.
    """
    cfg = text.shape[0] == 2 * latents.shape[0]
    x_in = torch.cat([latents] * 2) if cfg else latents
    x_in = scheduler.scale_model_input(x_in, t).to(backbone.unet.dtype)
    capture = None
    with contextlib.ExitStack() as stack:
        if capture_layers:
            capture = stack.enter_context(capture_token_maps(backbone.unet, index, capture_layers,
                                                             tuple(latents.shape[-2:])))
        out = backbone.unet(x_in, t, encoder_hidden_states=text).sample.float()
    maps = capture.maps()[-latents.shape[0]:].float() if capture is not None else None  # conditional rows
    if cfg:
        uncond, cond = out.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    return out, maps


# ------------------------------------------------------------------------------------------------ concept


def base_processors(processors: dict) -> dict:
    """The base model's processors: our processors with trained copies become plain ones (base weights, still able
    to capture maps); any other processor (the stock ones of a fresh backbone) is kept."""
    out = {}
    for name, proc in processors.items():
        if isinstance(proc, ClicCrossAttnProcessor) and proc.trained_linears():
            plain = ClicCrossAttnProcessor(explicit_softmax=proc.explicit_softmax)
            plain.name = name
            proc = plain
        out[name] = proc
    return out


@contextlib.contextmanager
def concept_applied(backbone, concept) -> Iterator[tuple[dict, dict]]:
    """Apply ``concept`` to ``backbone`` for the body; yields ``(base processors, concept processors)``.

    The UNet's processors are restored on exit (the placeholder tokens stay in the tokenizer: re-applying the
    same concept later only refreshes their embeddings).
    """
    unet = backbone.unet
    saved = dict(unet.attn_processors)
    base = base_processors(saved)
    try:
        concept.apply(backbone)
        yield base, dict(unet.attn_processors)
    finally:
        unet.set_attn_processor(saved)


@contextlib.contextmanager
def sampling_speedups(backbone, cfg: SamplingConfig) -> Iterator[None]:
    """The UNet as a denoising loop runs it fastest, for the body: compiled (``--compile-unet``), or else with each
    layer's text K/V computed once (:func:`clic.attention.text_kv_cached`), and self-attention's Q/K/V as one matmul.
    Enter it after the concept's processors are installed; everything is put back on exit."""
    with compiled_forward(backbone.unet, cfg.compile_mode, cfg.compile_unet), \
            text_kv_cached(backbone.unet, enabled=not cfg.compile_unet), fused_self_attention(backbone.unet):
        yield


def chunks(items: Sequence, size: int) -> Iterator[list]:
    for k in range(0, len(items), size):
        yield list(items[k:k + size])


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class SeedBatch:
    """One batch of seeds of a sampling loop, set up as every loop needs it (see :func:`seed_batches`)."""

    seeds: list[int]
    scheduler: object
    generators: list[torch.Generator]
    extra: dict                # the scheduler's step kwargs (DDIM eta, generator)
    latents: torch.Tensor      # the initial noise, scaled by the scheduler's init_noise_sigma
    bar: object                # progress bar of the batch's steps (closed when the next batch starts)


def seed_batches(backbone, cfg: SamplingConfig, seeds: Sequence[int], desc: str,
                 progress: bool) -> Iterator[SeedBatch]:
    """The batches of ``cfg.batch_size`` seeds of a text-to-image style loop: per batch a fresh scheduler
    (multistep samplers keep state), one generator per seed, the step kwargs, the initial noise (drawn first from
    the generators, as the stock pipelines do) and a progress bar of ``cfg.steps``."""
    for batch_seeds in chunks(list(seeds), cfg.batch_size):
        scheduler = make_scheduler(backbone, cfg)
        generators = generators_for(batch_seeds)
        extra = step_kwargs(scheduler, generators, cfg.ddim_eta)
        x = initial_noise(backbone, generators) * scheduler.init_noise_sigma
        bar = progress_bar(cfg.steps, f"{desc} (seed {batch_seeds[0]}{'...' if len(batch_seeds) > 1 else ''})",
                           progress)
        try:
            yield SeedBatch(batch_seeds, scheduler, generators, extra, x, bar)
        finally:
            bar.close()


def decode_batches(backbone, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1], ``batch_size`` at a time."""
    return torch.cat([backbone.decode(latents[k:k + batch_size]) for k in range(0, len(latents), batch_size)])
