"""Building blocks of the denoising loops of :mod:`clic.transfer` and :mod:`clic.generate` (and RealFill's).

The loops themselves live next to their feature and read top to bottom in the diffusers-pipeline style; this
module holds what they share: the scheduler, prompt encoding, seeded initial noise, one classifier-free-guided UNet
step (:func:`predict_noise`), and the plain loop over a range of steps (:func:`denoise`). The options they share are
:class:`clic.config.SamplingConfig`'s.

Randomness: every image has its own CPU ``torch.Generator`` seeded with its seed (as diffusers recommends), so
an image depends on its seed only, not on the device, the batch it ran in, or the other seeds.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .attention import capture_token_maps, text_kv_cached
from .capture import StepGraph
from .checks import FiniteWatch, check_finite
from .config import SamplingConfig
from .errors import InputError
from .models import TextConditioning
from .speed import compiled_forward, fused_self_attention, mark_step, to_device
from .tokens import token_positions

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ scheduler


def make_scheduler(backbone, cfg: SamplingConfig):
    """A fresh scheduler (:meth:`clic.models.Backbone.sampling_scheduler`) with ``cfg.steps`` timesteps set on the
    backbone's device."""
    scheduler = backbone.sampling_scheduler(cfg.scheduler)
    try:
        scheduler.set_timesteps(cfg.steps, device=backbone.device)
    except ValueError as exc:   # more steps than the model's training timesteps
        top = scheduler.config.get("num_train_timesteps")
        raise InputError(f"--steps {cfg.steps} is more than the model's {top} training timesteps" if top and
                         cfg.steps > top else f"--steps {cfg.steps}: {' '.join(str(exc).split())}") from exc
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
    n = batch or len(generators)
    shape = (n, backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    return randn_tensor(shape, generator=generators if len(generators) > 1 else generators[0],
                        device=backbone.device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ DDIM on the device


def ddim_update(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                alpha_prod_t_prev: torch.Tensor, eta: float = 0.0, prediction_type: str = "epsilon",
                clip_range: float | None = None, variance_noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t-1} of DDIM (eq. 12 and 16 of the DDIM paper) from the model output at x_t = ``sample``: diffusers'
    ``DDIMScheduler.step`` (``use_clipped_model_output`` off, no dynamic thresholding), operation for operation, with
    the cumulative alphas of t and of the previous timestep given as tensors instead of looked up by a host number.
    ``clip_range``: clip the predicted x_0 to [-r, r] (``clip_sample``); ``variance_noise``: the noise of eta > 0."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r} (epsilon | sample | v_prediction)")
    if clip_range is not None:
        pred_original_sample = pred_original_sample.clamp(-clip_range, clip_range)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if eta > 0:
        prev_sample = prev_sample + std_dev_t * variance_noise
    return prev_sample


class DeviceDDIM:
    """DDIM's update for a step recorded as a CUDA graph (``--cuda-graphs capture``): the step is a device index
    into the schedule, not a host number.

    ``scheduler.step`` takes the timestep as a Python number and looks the alphas up with it on the host, which a
    recorded graph would freeze at the recorded step. Here the cumulative alphas of every step's timestep and of its
    previous timestep (as diffusers finds it: t - T / N, or ``final_alpha_cumprod`` below 0, which
    ``set_alpha_to_one`` and ``steps_offset`` decide) are tables on the device, gathered by the step index inside
    the step; :func:`ddim_update` is the rest of ``scheduler.step``, the same numbers to the bit."""

    def __init__(self, scheduler, eta: float, device):
        config = scheduler.config
        if type(scheduler).__name__ != "DDIMScheduler":
            raise InputError(f"--cuda-graphs capture runs DDIM's update (--scheduler ddim), not "
                             f"{type(scheduler).__name__}")
        if config.get("thresholding"):
            raise InputError("--cuda-graphs capture does not run DDIM's dynamic thresholding, which the model's "
                             "scheduler config sets: use --cuda-graphs off")
        timesteps = host_timesteps(scheduler)
        alphas = scheduler.alphas_cumprod.cpu()
        prev = timesteps - config.num_train_timesteps // scheduler.num_inference_steps
        alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod.cpu())
        self.alpha_t = to_device(alphas[timesteps], device)            # (N,): step i's cumulative alpha
        self.alpha_prev = to_device(alpha_prev, device)                  # (N,): its previous timestep's
        self.eta = eta
        self.prediction_type = config.prediction_type
        self.clip_range = config.clip_sample_range if config.clip_sample else None

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, index: torch.Tensor,
             variance_noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t-1} at the schedule's step ``index`` (a ``(1,)`` long tensor on the device)."""
        alpha_t = self.alpha_t.index_select(0, index).squeeze(0)
        alpha_prev = self.alpha_prev.index_select(0, index).squeeze(0)
        return ddim_update(model_output, sample, alpha_t, alpha_prev, self.eta, self.prediction_type,
                           self.clip_range, variance_noise)


# ------------------------------------------------------------------------------------------------ prompts


def check_prompt(prompt: str, tokens: Sequence[str]) -> list[str]:
    """The concept tokens that occur in ``prompt``; an :class:`InputError` if there is none."""
    found = [t for t in tokens if t in prompt]
    if not found:
        raise InputError(f"prompt {prompt!r} does not contain the concept's token "
                         f"{' or '.join(tokens)}")
    return found


@torch.no_grad()
def encode_prompt(backbone, prompt: str, negative_prompt: str, batch: int, cfg: bool) -> TextConditioning:
    """The UNet's text conditioning: 2B rows, [unconditional x B; conditional x B], with CFG, else B rows.

    Same order and tokenisation (padded to the model length) as diffusers' pipelines; the unconditional row is the
    backbone's (:meth:`clic.models.Backbone.encode_negative`: SDXL's empty negative prompt is zeros).
    """
    cond = backbone.encode_text(backbone.tokenize(prompt)).to(backbone.unet.dtype).expand(batch)
    if not cfg:
        return cond
    uncond = backbone.encode_negative(negative_prompt).to(backbone.unet.dtype).expand(batch)
    return TextConditioning.cat([uncond, cond])


def token_index(backbone, prompt: str, tokens: Sequence[str]) -> torch.Tensor:
    """``(1, T)`` positions of ``tokens`` in the tokenized ``prompt`` (found by tokenizing, on the host), on the
    backbone's device (where the capture uses them at every step)."""
    ids = backbone.tokenize(prompt, "cpu")
    return to_device(token_positions(ids, backbone.tokenizer.convert_tokens_to_ids(list(tokens)), prompt),
                     backbone.device)


# ------------------------------------------------------------------------------------------------ one step


def predict_noise(backbone, scheduler, latents: torch.Tensor, t: torch.Tensor, text: TextConditioning,
                  guidance_scale: float, capture_layers: Sequence[str] = (), index: torch.Tensor | None = None,
                  condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The classifier-free-guided model output for ``latents (B, C, h, w)`` at timestep ``t``.

    With ``capture_layers``, also CA(token, x_t) of the conditional rows, ``(B, T, h, w)`` fp32 (the tokens at
    ``index``). ``condition (B, C', h, w)``: channels appended to the scaled latents (SD inpainting's mask and
    masked-image latent). Runs under whatever grad mode the caller set.
    """
    cfg = len(text) == 2 * latents.shape[0]
    x_in = torch.cat([latents] * 2) if cfg else latents
    x_in = scheduler.scale_model_input(x_in, t)
    if condition is not None:
        x_in = torch.cat([x_in, torch.cat([condition] * 2 if cfg else [condition]).to(x_in.dtype)], 1)
    x_in = x_in.to(backbone.unet.dtype)
    capture = None
    with contextlib.ExitStack() as stack:
        if capture_layers:
            capture = stack.enter_context(capture_token_maps(backbone.unet, index, capture_layers,
                                                             tuple(latents.shape[-2:])))
        out = backbone.unet(x_in, t, **text.unet_kwargs()).sample.float()
    maps = capture.maps()[-latents.shape[0]:].float() if capture is not None else None  # conditional rows
    if cfg:
        uncond, cond = out.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    return out, maps


def denoise(backbone, scheduler, x: torch.Tensor, steps: range, text: TextConditioning, cfg: SamplingConfig,
            extra: dict, bar, callback=None, info: dict | None = None, condition: torch.Tensor | None = None,
            capture_layers: Sequence[str] = (), index: torch.Tensor | None = None, watch: FiniteWatch | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Steps ``steps`` of the schedule with whatever processors are installed; ``text`` holds [uncond; cond] rows
    (CFG) or cond rows for the ``B`` latents. Returns the latents and, with ``capture_layers``, CA(token, x_t) of
    the conditional rows at each step (``(B, T, h, w)`` each). ``callback`` gets ``info`` with ``step``,
    ``timestep`` and ``latents`` after every step; ``watch`` sees the latents after every step (the caller checks
    it before decoding)."""
    on_host = host_timesteps(scheduler)
    maps = []
    for i in steps:
        mark_step(cfg)
        noise_pred, ca = predict_noise(backbone, scheduler, x, scheduler.timesteps[i], text, cfg.guidance_scale,
                                       capture_layers, index, condition)
        if ca is not None:
            maps.append(ca)
        x = scheduler.step(noise_pred, on_host[i], x, **extra).prev_sample.float()
        if watch is not None:
            watch.see(x, i)
        bar.update(1)
        if callback is not None:
            callback({**(info or {}), "step": i, "timestep": int(on_host[i]), "latents": x})
    return x, maps


def denoise_captured(backbone, scheduler, ddim: DeviceDDIM, x: torch.Tensor, steps: range, text: TextConditioning,
                     cfg: SamplingConfig, generators: list[torch.Generator], bar, callback=None,
                     info: dict | None = None, watch: FiniteWatch | None = None) -> torch.Tensor:
    """:func:`denoise` with its step recorded as one CUDA graph (``--cuda-graphs capture``, :mod:`clic.capture`):
    the latent in a fixed tensor that the step reads and overwrites, the step index (and DDIM's noise for eta > 0,
    drawn on the host from the seeds' generators as ``scheduler.step`` draws it) copied in with one copy a step, the
    update by :class:`DeviceDDIM`. The first steps run eagerly, then the step is recorded and replayed; a stretch of
    fewer steps runs eagerly throughout. Returns the latents (the same as :func:`denoise`'s to the bit on the CPU).

    ``callback`` gets a copy of the latents (one device copy a step; the graph overwrites its own)."""
    on_host = host_timesteps(scheduler)
    device, shape = x.device, tuple(x.shape)
    stochastic = ddim.eta > 0
    latent = x.clone()                                              # the fixed latent
    inputs = torch.zeros(1 + (latent.numel() if stochastic else 0), device=device)
    if watch is not None:
        watch.on(device)

    def step() -> None:
        index = inputs[:1].long()
        t = scheduler.timesteps.index_select(0, index)
        noise_pred, _ = predict_noise(backbone, scheduler, latent, t, text, cfg.guidance_scale)
        x_next = ddim.step(noise_pred, latent, index, inputs[1:].view(shape) if stochastic else None)
        if watch is not None:
            watch.see_recorded(x_next, index[0])
        latent.copy_(x_next)

    graph = StepGraph(device)
    generator = generators if len(generators) > 1 else generators[0]
    try:
        for i in steps:
            parts = [torch.tensor([float(i)])]
            if stochastic:       # the numbers DDIM's step draws from the generators (randn_tensor on the CPU)
                parts.append(randn_tensor(shape, generator=generator, device=torch.device("cpu"),
                                          dtype=torch.float32).flatten())
            inputs.copy_(to_device(torch.cat(parts), device))
            graph(step, lambda: None)
            bar.update(1)
            if callback is not None:
                callback({**(info or {}), "step": i, "timestep": int(on_host[i]), "latents": latent.clone()})
    finally:
        graph.close()
    return latent


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
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


# ------------------------------------------------------------------------------------------------ batches


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
    """Scaled latents -> pixels in [-1, 1], ``batch_size`` at a time; a :class:`~clic.errors.NonFiniteError` if the
    latents or the pixels hold NaN or inf (e.g. a half-precision VAE that overflows), never such an image."""
    check_finite(latents, "the final latents")
    pixels = torch.cat([backbone.decode(latents[k:k + batch_size]) for k in range(0, len(latents), batch_size)])
    check_finite(pixels, "the decoded images", "a half-precision VAE can overflow: try --dtype fp32")
    return pixels
