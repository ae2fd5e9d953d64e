"""Concept transfer (paper sec. 3.2): edit a target image so that its masked region shows the learned concept v*.

Per image (one per seed), with x_tg the VAE latent of the target, encoded once, and eps one Gaussian draw:

    x_start  = noised(x_tg, t_start)                                   the target noised to the start step
    for each step i = start .. N-1 (timestep t_i):
        x'_t  = M_tg * x_t + (1 - M_tg) * noised(x_tg, t_i)            blend, eq. 6 (inside the blending range)
        x''_t = x'_t - eta * grad ||CA(v*, x'_t) - M_tg||^2             attention_guidance_step, eq. 7 (guided range)
        x_{t-1} = scheduler.step(CFG eps_theta(x''_t, c, t_i), t_i, x''_t)
    x_0'     = M_tg * x_0 + (1 - M_tg) * x_tg                           eq. 6 at t = 0 (paper: blend at every step)
    image    = alpha * decode(x_0') + (1 - alpha) * target             pixel composite, alpha = feathered M_tg

with noised(x, t) = scheduler.add_noise(x, eps, t), the same eps at every step (as diffusers' inpainting
pipeline), so outside the mask the latent follows exactly the target's forward-noising path (the official script
draws a fresh eps at every step instead: ``blend_noise="fresh"``). The model sees a centre crop of the target
resized to its resolution; the CLI pastes the result back into the target at its own size (:func:`paste_back`), so
every pixel outside the feathered mask is the target file's.

Every random number (the start noise, the blending noise, DDIM's noise, a posterior sample of x_tg) is a named draw
of the seed's :class:`clic.draws.Draws` (default: seeded with the seed), which a caller can replace
(``transfer(..., draws=...)``) to feed two transfers the same draws.

With ``--cuda-graphs capture`` (DDIM) the same steps run over fixed tensors and each kind of step (guided or not,
blended or not) is recorded once as a CUDA graph and replayed (:class:`StaticTransferStep`, :mod:`clic.capture`):
the host launches one graph a step instead of the ~2,100 operators of a guided step (BENCHMARKS.md).

The start of the edit can be given in the three ways in use (exactly one, or none for the default):

- ``t_start`` (paper): the first t_start of the N steps are skipped ("we add T - t_start levels of noise to
  x_tg", 5 <= t_start <= 15 with T = 50). Default 15 of 50: the strongest edit of the paper's range, and the
  value the official script uses (15 replaced steps).
- ``replace_steps`` K (official code): at the steps i < K the latent is overwritten by the noised target. Steps
  i < K - 1 are then wasted (their output is overwritten), so this is t_start = K - 1, run without the wasted
  UNet calls; K = 0 starts from pure noise.
- ``strength`` (diffusers img2img): t_start = N - int(N * strength); identical to
  ``StableDiffusionImg2ImgPipeline`` with blending, guidance and composite off (see the tests).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from .attention import attention_outputs_detached, cross_attention_layers
from .capture import StepGraph
from .checks import FiniteWatch
from .concept import applied_concept
from .config import TransferConfig
from .draws import Draws, SeededDraws
from .errors import InputError
from .imaging import center_crop_box, check_mask, chessboard_distance, pil_resize, resize_mask
from .models import TextConditioning
from .sampling import (DeviceDDIM, check_prompt, chunks, decode_batches, encode_prompt, host_timesteps,
                       make_scheduler, predict_noise, progress_bar, sampling_speedups, step_kwargs, token_index)
from .speed import mark_step, to_device

log = logging.getLogger(__name__)

GUIDANCE_HINT = "try a smaller --eta or --guidance-scale"


# ---------------------------------------------------------------------------------------------- the equations


def blend(x_t: torch.Tensor, x_target_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6: x'_t = M_tg * x_t + (1 - M_tg) * (x_tg + noise(t)); ``x_target_t`` is the target noised to t."""
    return mask * x_t + (1 - mask) * x_target_t


def guidance_loss(ca: torch.Tensor, target_map: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """||CA(v*, x_t) - M||^2 per image: ``ca (B, T, h, w)`` vs ``target_map (1, 1, h, w)`` -> ``(B,)``: the sum over
    tokens and pixels (a sum, not a mean, so each image's gradient does not depend on the batch or map size), or
    with ``reduction="mean"`` their mean (the official code's MSE)."""
    err = ((ca.float() - target_map.float()) ** 2).flatten(1)
    if reduction == "sum":
        return err.sum(1)
    if reduction == "mean":
        return err.mean(1)
    raise ValueError(f"unknown guidance loss reduction {reduction!r} (sum | mean)")


def attention_guidance_step(backbone, scheduler, x: torch.Tensor, t: torch.Tensor, text_cond: TextConditioning,
                            index: torch.Tensor, layers: list[str], target_map: torch.Tensor, eta: float,
                            optimizer: str = "sgd", reduction: str = "sum", attention_grad: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 7: x''_t = x'_t - eta * grad_x ||CA(v*, x'_t) - M||^2, one UNet forward and backward on the conditional
    branch only.

    The latent, the maps (logits formed in fp32 by the capture) and the loss are fp32 also under a half-precision
    UNet; only the UNet's own layers run in its dtype. ``optimizer="adam"`` takes one step of a fresh Adam of
    learning rate ``eta`` instead (official code; about ``eta * sign(grad)``). ``reduction``: the loss summed or
    averaged over pixels (:func:`guidance_loss`). ``attention_grad=False`` is the official code's gradient: none
    through the attention layers' outputs (:func:`clic.attention.attention_outputs_detached`).

    Returns ``(x''_t, CA(v*, x'_t) (B, T, h, w), loss per image (B,))``.
    """
    x, grad, ca, loss = guidance_gradient(backbone, scheduler, x, t, text_cond, index, layers, target_map, reduction,
                                          attention_grad)
    return guided_latent(x, grad, eta, optimizer), ca, loss


def guidance_gradient(backbone, scheduler, x: torch.Tensor, t: torch.Tensor, text_cond: TextConditioning,
                      index: torch.Tensor, layers: list[str], target_map: torch.Tensor, reduction: str = "sum",
                      attention_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of eq. 7: ``(x'_t in fp32, grad_x ||CA(v*, x'_t) - M||^2, CA(v*, x'_t), loss per image)``, from
    one UNet forward and backward on the conditional rows (see :func:`attention_guidance_step`)."""
    with torch.enable_grad(), attention_outputs_detached(backbone.unet, not attention_grad):
        x = x.detach().float().requires_grad_(True)
        _, ca = predict_noise(backbone, scheduler, x, t, text_cond, 1.0, layers, index)
        loss = guidance_loss(ca, target_map, reduction)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return x.detach(), grad, ca.detach(), loss.detach()


def fresh_adam_step(x: torch.Tensor, grad: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.Tensor:
    """``x`` after the first step of a fresh ``torch.optim.Adam([x], lr)`` with gradient ``grad`` (the guidance's
    Adam variant, eq. 7 in the official code), in closed form on the device: the moments start at zero and the step
    count is 1, so nothing is read back or kept between steps (a recorded step cannot hold an optimiser whose step
    count lives on the host). The operations of torch's single-tensor Adam, in its order: the same numbers."""
    beta1, beta2 = betas
    exp_avg = torch.zeros_like(grad).lerp_(grad, 1 - beta1)
    exp_avg_sq = torch.zeros_like(grad).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1, bias_correction2 = 1 - beta1**1.0, 1 - beta2**1.0
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    return x.clone().addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def guided_latent(x: torch.Tensor, grad: torch.Tensor, eta: float, optimizer: str = "sgd") -> torch.Tensor:
    """Eq. 7's update in closed form: ``x - eta * grad`` (sgd), or a fresh Adam's first step (:func:`fresh_adam_step`,
    adam)."""
    if optimizer == "sgd":
        return x - eta * grad
    if optimizer == "adam":
        return fresh_adam_step(x, grad, eta)
    raise ValueError(f"unknown guidance optimizer {optimizer!r} (sgd | adam)")


def latent_mask(mask: torch.Tensor, hw: tuple[int, int], mode: str = "any") -> torch.Tensor:
    """M_tg ``(1, R, R)`` at latent resolution ``(1, 1, h, w)`` for eq. 6 (see ``TransferConfig.blend_mask``);
    ``bicubic`` keeps the soft values of ``mask`` (8-bit grey levels resized by PIL's bicubic filter, as the official
    script resizes its mask file)."""
    m = mask.float().reshape(1, 1, *mask.shape[-2:])
    if mode == "bicubic":
        values = pil_resize(m[0, 0].cpu().numpy(), hw, Image.BICUBIC)
        return torch.from_numpy(values)[None, None].to(mask.device)
    if mode == "any":
        return F.adaptive_max_pool2d(m, hw)
    area = F.adaptive_avg_pool2d(m, hw)
    if mode == "area":
        return area
    if mode == "half":
        return (area >= 0.5).float()
    raise ValueError(f"unknown latent mask mode {mode!r} (any | area | half | bicubic)")


def feather_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Alpha ``(1, 1, R, R)`` of the pixel composite: 1 on M_tg, falling linearly to 0 over ``radius`` pixels
    outside it (chessboard distance), exactly 0 farther away: the mean of the mask's k-dilations, k = 0 .. radius-1.
    A binary mask on the CPU (every mask the commands read) takes one distance transform instead, to the bit the
    same, in time that does not grow with the radius (0.2 s for 512 px at radius 8 to 32, where the dilations take
    0.4 s to 21 s; a photo's own size scales the radius with it, and the dilations took hours)."""
    m = mask.float().reshape(1, 1, *mask.shape[-2:])
    if radius <= 0:
        return m
    if m.device.type == "cpu" and bool(((m == 0) | (m == 1)).all()):
        # a pixel at chessboard distance d < radius lies in the k-dilations for k >= d: (radius - d) of them
        d = chessboard_distance(m[0, 0] > 0.5, radius)
        return ((radius - d).float() / radius)[None, None]
    dilations = [F.max_pool2d(m, 2 * k + 1, stride=1, padding=k) for k in range(radius)]
    return torch.stack(dilations).mean(0)


def composite(decoded: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha * decoded + (1 - alpha) * target``: where alpha is 0 the result is the target, bit for bit, whatever
    ``decoded`` holds there (0 * NaN would be NaN)."""
    return torch.where(alpha > 0, alpha * decoded + (1 - alpha) * target, target)


def paste_back(decoded: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, radius: int) -> torch.Tensor:
    """The pixel composite at the target's own size: ``decoded (N, 3, R, R)`` (the model's view, a centre crop
    resized to R) is scaled back onto its crop of ``original (3, H, W)`` and blended in with the feathered full-size
    ``mask (1, H, W)`` (``radius`` in full-size pixels). Outside the feathered mask, and outside the crop, the
    pixels are the original's, bit for bit. Returns ``(N, 3, H, W)``."""
    height, width = original.shape[-2:]
    left, top, right, bottom = center_crop_box(width, height)
    side = right - left
    crop = decoded.float()
    if side != crop.shape[-1]:
        crop = F.interpolate(crop, size=(side, side), mode="bicubic", align_corners=False).clamp(-1, 1)
    alpha = torch.zeros(1, 1, height, width)
    alpha[..., top:bottom, left:right] = 1                         # the model never saw the rest
    alpha = alpha * feather_mask(mask, radius)
    edited = original[None].float().repeat(len(decoded), 1, 1, 1)
    edited[..., top:bottom, left:right] = crop
    return composite(edited, original[None].float(), alpha)


# ---------------------------------------------------------------------------------------------- transfer


@dataclass
class TransferResult:
    """Outputs of :func:`transfer`; N images (one per seed), R the model resolution, h x w the latent size."""

    images: torch.Tensor        # (N, 3, R, R) in [-1, 1]: the results (composited unless cfg.composite is off)
    decoded: torch.Tensor       # (N, 3, R, R): VAE decoding of the final latents, before the composite
    latents: torch.Tensor       # (N, C, h, w): final latents
    target: torch.Tensor        # (3, R, R): the target image
    mask: torch.Tensor          # (1, R, R): binary M_tg
    blend_mask: torch.Tensor    # (1, 1, h, w): M_tg used by eq. 6
    alpha: torch.Tensor         # (1, 1, R, R): the composite's feathered mask
    attention: torch.Tensor     # (S, N, T, h, w): CA(v*, x''_t) of the conditional branch at each step that ran
    guidance_loss: torch.Tensor  # (S, N): ||CA(v*, x'_t) - M||^2 before each guided step (nan where unguided)
    steps: list[int]            # the S step indices that ran (start .. steps-1)
    timesteps: list[int]        # their timesteps
    guided_steps: list[int]     # the step indices that got the guidance step
    seeds: list[int]
    prompt: str
    tokens: list[str]           # the concept tokens whose maps are in ``attention``


def _prepare_inputs(backbone, target: torch.Tensor, mask: torch.Tensor, threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = backbone.resolution
    target = torch.as_tensor(target).float()
    if target.shape != (3, size, size):
        raise InputError(f"target must be a (3, {size}, {size}) image in [-1, 1] (clic.imaging.load_image), got "
                         f"{tuple(target.shape)}")
    mask = torch.as_tensor(mask).float()
    if mask.ndim >= 2 and mask.numel() == mask.shape[-2] * mask.shape[-1]:     # (H, W), (1, H, W), (1, 1, H, W)
        mask = mask.reshape(1, *mask.shape[-2:])
    if mask.ndim != 3 or mask.shape[-2:] != target.shape[-2:]:
        raise InputError(f"target mask {tuple(mask.shape)} and target {tuple(target.shape)} differ in size")
    soft, mask = mask, (mask > threshold).float()
    check_mask(mask, "target mask")
    return target.to(backbone.device), mask.to(backbone.device), soft.to(backbone.device)


@torch.no_grad()
def transfer(backbone, concept, target: torch.Tensor, mask: torch.Tensor, cfg: TransferConfig | None = None,
             progress: bool = True, callback: Callable[[dict], None] | None = None,
             draws: Callable[[int], Draws] | None = None, blend_mask: torch.Tensor | None = None) -> TransferResult:
    """Transfer ``concept`` into the region ``mask`` of ``target`` (paper sec. 3.2); one result per seed.

    Args:
        backbone: the base model the concept was learned on (:func:`clic.models.load_backbone`); the concept is
            applied for the call, and the backbone is as it was afterwards.
        concept: a :class:`clic.concept.Concept`.
        target: I_tg, ``(3, R, R)`` in [-1, 1] at the model resolution R.
        mask: M_tg, ``(1, R, R)`` or ``(R, R)``, thresholded at ``cfg.mask_threshold`` (``cfg.blend_mask`` bicubic
            resizes its values as given).
        draws: ``draws(seed)``: the source of the seed's random draws (:mod:`clic.draws`); default
            :class:`~clic.draws.SeededDraws` of the seed.
        blend_mask: M_tg at the latent size ``(1, 1, h, w)`` for eq. 6, made by the caller (e.g. from the mask file,
            :func:`clic.imaging.load_latent_mask`); default: from ``mask`` by ``cfg.blend_mask``.
        callback: called after every denoising step with a dict: ``step``, ``timestep``, ``seeds``, ``latents``
            (after the step), ``blended`` (x'_t, or None), ``target_noised`` (noised(x_tg, t), or None), ``guided``
            (x''_t, or None), ``maps`` (CA(v*, x''_t), ``(B, T, h, w)``), ``guidance_loss``. Under
            ``--cuda-graphs capture`` the same tensors, copied out of the recorded step's buffers (a few device
            copies a step; nothing is read back unless the callback reads it).
    """
    cfg = cfg or TransferConfig()

    # 1. Check inputs (before any model work)
    cfg.check()
    start, n_steps = cfg.start_step(), cfg.steps
    seeds = cfg.seed_list()
    prompt = cfg.prompt if cfg.prompt is not None else concept.meta.get("prompt", "")
    tokens = check_prompt(prompt, concept.tokens)
    target, mask, soft = _prepare_inputs(backbone, target, mask, cfg.mask_threshold)

    with applied_concept(backbone, concept), sampling_speedups(backbone, cfg):
        # 2. Encode the prompt; find v* by tokenizing
        text = encode_prompt(backbone, prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        index = token_index(backbone, prompt, tokens)
        layers = cross_attention_layers(backbone.unet, cfg.attn_blocks)

        # 3. Encode the target once (its posterior, if x_tg is a sample of it); M_tg at latent resolution (blending)
        #    and at map resolution (guidance)
        if cfg.posterior == "sample":
            x_tg = backbone.encode_posterior(target[None])                         # (mean, std), (1, C, h, w) each
            hw = tuple(x_tg[0].shape[-2:])
        else:
            x_tg = backbone.encode_image(target[None])                              # (1, C, h, w)
            hw = tuple(x_tg.shape[-2:])
        if blend_mask is not None:
            m_blend = blend_mask.float().reshape(1, 1, *hw).to(backbone.device)
        else:
            m_blend = latent_mask(soft if cfg.blend_mask == "bicubic" else mask, hw, cfg.blend_mask)
        target_map = resize_mask(mask[None], hw) if cfg.guidance_target == "mask" else torch.ones(1, 1, *hw)
        target_map = target_map.to(backbone.device)

        # 4. Denoise, a batch of seeds at a time (4a, 4b in _denoise)
        latents, maps, losses = [], [], []
        for batch_seeds in chunks(seeds, cfg.batch_size):
            sources = [(draws or SeededDraws)(seed) for seed in batch_seeds]
            lat, m, loss, timesteps = _denoise(backbone, cfg, batch_seeds, sources, x_tg, m_blend, target_map, text,
                                               index, layers, start, progress, callback)
            latents.append(lat)
            maps.append(m)
            losses.append(loss)
        latents = torch.cat(latents)

        # 5. Decode; paste into the target in pixel space
        decoded = decode_batches(backbone, latents, cfg.batch_size)
        radius = cfg.feather if cfg.feather is not None else backbone.resolution // 64
        alpha = feather_mask(mask, radius)
        images = composite(decoded, target[None], alpha) if cfg.composite else decoded

    steps = list(range(start, n_steps))
    return TransferResult(
        images=images.cpu(), decoded=decoded.cpu(), latents=latents.cpu(), target=target.cpu(), mask=mask.cpu(),
        blend_mask=m_blend.cpu(), alpha=alpha.cpu(), attention=torch.cat(maps, 1), guidance_loss=torch.cat(losses, 1),
        steps=steps, timesteps=[int(t) for t in timesteps], guided_steps=[i for i in steps if cfg.guided(i)],
        seeds=seeds, prompt=prompt, tokens=tokens,
    )


def _host_normal(sources: list[Draws], name: str, backbone) -> torch.Tensor:
    """``(B, C, h, w)``: one latent-shaped Gaussian draw ``name`` per seed, on the host (as diffusers' randn_tensor
    draws a batch from per-image generators)."""
    shape = (1, backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    return torch.cat([d.normal(name, shape) for d in sources])


def _normal(sources: list[Draws], name: str, backbone) -> torch.Tensor:
    """:func:`_host_normal` on the device."""
    return to_device(_host_normal(sources, name, backbone), backbone.device)


def _denoise(backbone, cfg: TransferConfig, seeds: list[int], sources: list[Draws], x_tg, m_blend: torch.Tensor,
             target_map: torch.Tensor, text: TextConditioning, index: torch.Tensor, layers: list[str], start: int,
             progress: bool, callback) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """The denoising loop for one batch of seeds: blend (eq. 6), guide (eq. 7), step (``--cuda-graphs capture``:
    the same steps recorded as CUDA graphs, :func:`_denoise_captured`). ``x_tg``: the target's latent
    ``(1, C, h, w)``, or its posterior (mean, std) to draw one per seed. Returns final latents, the maps
    ``(S, B, T, h, w)`` and guidance losses ``(S, B)`` per step, and the timesteps that ran."""
    batch = len(seeds)
    scheduler = make_scheduler(backbone, cfg)                  # fresh per batch: multistep samplers keep state
    timesteps = scheduler.timesteps
    on_host = host_timesteps(scheduler)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)                       # sigma-indexed samplers (as diffusers img2img)
    generators = [d.generator for d in sources]
    extra = step_kwargs(scheduler, generators, cfg.ddim_eta)
    # DDIM's own noise (eta > 0) as a named draw: the numbers it would draw from the seeds' generators
    variance = "variance_noise" in inspect.signature(scheduler.step).parameters and cfg.ddim_eta > 0
    if variance:
        extra.pop("generator", None)
    text = text.repeat_interleave(batch)                    # [uncond x B; cond x B] or [cond x B]
    text_cond = text[-batch:]

    # 4a. Prepare latents: the target noised to the start step (or pure noise, official --replace-steps 0)
    noise = _normal(sources, "initial", backbone)
    if isinstance(x_tg, tuple):                                # a posterior sample of x_tg per seed
        x_tg = backbone.posterior_sample(*x_tg, _normal(sources, "target", backbone))
    else:
        x_tg = x_tg.expand(batch, -1, -1, -1)
    fresh = cfg.blend_noise == "fresh"

    def blend_draw(i: int) -> torch.Tensor | None:
        """Step i's blending noise on the host (``blend_noise fresh``); None: ``noise``, the same at every step."""
        return _host_normal(sources, f"{i}/blend", backbone) if fresh else None

    def blend_noise(draw: torch.Tensor | None) -> torch.Tensor:
        return noise if draw is None else to_device(draw, backbone.device)

    # the official script overwrites the latent with the noised target at the steps before its start: the last of
    # them is this one, with its own blending noise (also the start step's, if it is blended)
    start_draw = blend_draw(start) if cfg.blended(start) or not cfg.starts_from_noise else None
    step_noise = blend_noise(start_draw)
    if cfg.starts_from_noise:
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(x_tg, step_noise, timesteps[start:start + 1].expand(batch))

    # 4b. Denoising loop
    bar = progress_bar(len(timesteps) - start, f"transfer (seed {seeds[0]}{'...' if batch > 1 else ''})", progress)
    if cfg.cuda_graphs == "capture":
        static = StaticTransferStep(backbone, cfg, scheduler, x, x_tg, noise, m_blend, target_map, text, text_cond,
                                    index, layers, start)
        _denoise_captured(static, sources, start_draw, blend_draw, seeds, on_host, bar, callback)
        x, maps, losses = static.x, static.maps, static.losses
        watch = static.watch
    else:
        maps, losses = [], []
        watch = FiniteWatch("the transfer's latents", GUIDANCE_HINT)
        for i in range(start, len(timesteps)):
            mark_step(cfg)
            t = timesteps[i]
            blended = target_noised = guided = loss = None
            if cfg.blended(i):
                eps = step_noise if i == start else blend_noise(blend_draw(i))
                target_noised = scheduler.add_noise(x_tg, eps, t.expand(batch))
                x = blended = blend(x, target_noised, m_blend)
            if cfg.guided(i):
                x, _, loss = attention_guidance_step(backbone, scheduler, x, t, text_cond, index, layers, target_map,
                                                     cfg.eta, cfg.guidance_optimizer, cfg.guidance_reduction,
                                                     cfg.guidance_attention_grad)
                guided = x
            noise_pred, ca = predict_noise(backbone, scheduler, x, t, text, cfg.guidance_scale, layers, index)
            if variance:
                extra["variance_noise"] = _normal(sources, f"{i}/variance", backbone)
            x = scheduler.step(noise_pred, on_host[i], x, **extra).prev_sample.float()
            watch.see(x, i)
            maps.append(ca)                      # kept on the device: no wait for it at every step
            losses.append(loss if loss is not None else torch.full((batch,), float("nan"), device=x.device))
            bar.update(1)
            if callback is not None:
                callback({"step": i, "timestep": int(on_host[i]), "seeds": seeds, "latents": x, "blended": blended,
                          "target_noised": target_noised, "guided": guided, "maps": ca, "guidance_loss": loss})
        maps, losses = torch.stack(maps), torch.stack(losses)
    bar.close()
    watch.check()
    if cfg.blended(len(timesteps)):
        x = blend(x, x_tg, m_blend)                            # eq. 6 at t = 0: noised(x_tg, 0) = x_tg
    return x, maps.cpu(), losses.cpu(), on_host[start:].tolist()


# ---------------------------------------------------------------------------------------------- the step as a graph


class StaticTransferStep:
    """One step of the transfer's denoising loop over fixed tensors (``--cuda-graphs capture``, :mod:`clic.capture`):
    the plain loop's blend (eq. 6), guidance (eq. 7), classifier-free pass and DDIM update, written so that the step
    can be recorded once as a CUDA graph and replayed at every later step of its kind.

    - the latent lives in :attr:`x`, which the step reads and overwrites with the next latent;
    - :meth:`load` copies the step's values into one fixed device tensor (one copy from the host): the step index
      (the timestep and DDIM's alphas are gathered from device tables by it, :class:`clic.sampling.DeviceDDIM`), the
      step's row in the outputs, the fresh blending noise and DDIM's noise (eta > 0), drawn on the host as the plain
      loop draws them;
    - the guidance's update is in closed form (:func:`guided_latent`: sgd, or a fresh Adam's first step);
    - CA(v*) and the guidance loss go into the step's row of :attr:`maps` ``(S, B, T, h, w)`` and :attr:`losses`
      ``(S, B)`` (nan where unguided), preallocated; the NaN watch keeps its flag on the device.

    Nothing in :meth:`run` reads a device value or copies from the host."""

    def __init__(self, backbone, cfg: TransferConfig, scheduler, x: torch.Tensor, x_tg: torch.Tensor,
                 noise: torch.Tensor, m_blend: torch.Tensor, target_map: torch.Tensor, text: TextConditioning,
                 text_cond: TextConditioning, index: torch.Tensor, layers: list[str], start: int):
        self.backbone, self.cfg, self.scheduler, self.start = backbone, cfg, scheduler, start
        self.x_tg, self.noise, self.m_blend, self.target_map = x_tg, noise, m_blend, target_map
        self.text, self.text_cond, self.index, self.layers = text, text_cond, index, layers
        device, batch = x.device, len(x)
        self.ddim = DeviceDDIM(scheduler, cfg.ddim_eta, device)
        self.x = x.clone()                                          # the fixed latent
        self.fresh, self.stochastic = cfg.blend_noise == "fresh", cfg.ddim_eta > 0
        sizes = {"step": 1, "row": 1, "blend": x.numel() if self.fresh else 0,
                 "variance": x.numel() if self.stochastic else 0}
        self.slices, at = {}, 0
        for name, size in sizes.items():
            self.slices[name] = slice(at, at + size)
            at += size
        self.inputs = torch.zeros(at, device=device)
        rows = cfg.steps - start
        self.maps = torch.zeros(rows, batch, index.shape[-1], *x.shape[-2:], device=device)
        self.losses = torch.full((rows, batch), float("nan"), device=device)
        self.watch = FiniteWatch("the transfer's latents", GUIDANCE_HINT).on(device)
        self.outputs: dict[tuple[bool, bool], dict] = {}         # per kind of step: its x'_t, noised(x_tg, t), x''_t

    def load(self, i: int, blend_noise: torch.Tensor | None, variance_noise: torch.Tensor | None) -> None:
        """Step ``i``'s values (the noise tensors on the host, None where the step needs none) into the fixed input
        tensor, in one copy (integers as fp32: exact below 2^24)."""
        values = {"step": torch.tensor([float(i)]), "row": torch.tensor([float(i - self.start)]),
                  "blend": blend_noise, "variance": variance_noise}
        parts = [values[name].flatten() if values[name] is not None else torch.zeros(sl.stop - sl.start)
                 for name, sl in self.slices.items()]
        self.inputs.copy_(to_device(torch.cat(parts), self.inputs.device))

    def view(self, name: str) -> torch.Tensor:
        return self.inputs[self.slices[name]]

    def run(self, guided: bool, blended: bool) -> None:
        """The loaded step (of the kind ``guided``, ``blended``): :attr:`x` becomes the next latent."""
        cfg, backbone, scheduler = self.cfg, self.backbone, self.scheduler
        step, row = self.view("step").long(), self.view("row").long()             # (1,) each
        t = scheduler.timesteps.index_select(0, step)                               # (1,): t_i on the device
        x, out = self.x, {}
        if blended:
            eps = self.view("blend").view_as(x) if self.fresh else self.noise
            out["target_noised"] = scheduler.add_noise(self.x_tg, eps, t.expand(len(x)))
            x = out["blended"] = blend(x, out["target_noised"], self.m_blend)
        if guided:
            x, grad, _, loss = guidance_gradient(backbone, scheduler, x, t, self.text_cond, self.index, self.layers,
                                                 self.target_map, cfg.guidance_reduction, cfg.guidance_attention_grad)
            x = out["guided"] = guided_latent(x, grad, cfg.eta, cfg.guidance_optimizer)
            self.losses.index_copy_(0, row, loss[None])
        noise_pred, ca = predict_noise(backbone, scheduler, x, t, self.text, cfg.guidance_scale, self.layers,
                                       self.index)
        x_next = self.ddim.step(noise_pred, x, step, self.view("variance").view_as(x) if self.stochastic else None)
        self.watch.see_recorded(x_next, step[0])
        self.maps.index_copy_(0, row, ca[None])
        self.x.copy_(x_next)
        self.outputs[(guided, blended)] = out

    def info(self, i: int, kind: tuple[bool, bool], seeds: list[int], timestep: int) -> dict:
        """The callback's dict of step ``i`` (as the plain loop's): copies of the step's tensors that the next
        replay overwrites (a few device copies, no read), views of its rows of the outputs."""
        out, row = self.outputs[kind], i - self.start
        copied = {k: out[k].clone() if k in out else None for k in ("blended", "target_noised", "guided")}
        return {"step": i, "timestep": timestep, "seeds": seeds, "latents": self.x.clone(), **copied,
                "maps": self.maps[row], "guidance_loss": self.losses[row] if kind[0] else None}


def _denoise_captured(static: StaticTransferStep, sources: list[Draws], start_draw: torch.Tensor | None,
                      blend_draw: Callable[[int], torch.Tensor | None], seeds: list[int], on_host: torch.Tensor, bar,
                      callback) -> None:
    """The denoising loop with each kind of step (guided or not, blended or not) recorded as a CUDA graph after
    :data:`clic.capture.WARMUP_STEPS` eager steps of its kind and replayed: the same draws in the same order as the
    plain loop (the step's blending noise, then DDIM's), one copy to the device a step. The results are left in
    ``static``."""
    cfg, backbone = static.cfg, static.backbone
    graphs: dict[tuple[bool, bool], StepGraph] = {}
    try:
        for i in range(static.start, cfg.steps):
            kind = (cfg.guided(i), cfg.blended(i))
            blend_noise = (start_draw if i == static.start else blend_draw(i)) if kind[1] else None
            variance_noise = _host_normal(sources, f"{i}/variance", backbone) if static.stochastic else None
            static.load(i, blend_noise, variance_noise)
            if kind not in graphs:
                graphs[kind] = StepGraph(static.x.device)
            graphs[kind](functools.partial(static.run, *kind), _nothing)
            bar.update(1)
            if callback is not None:
                callback(static.info(i, kind, seeds, int(on_host[i])))
    finally:
        for graph in graphs.values():
            graph.close()


def _nothing() -> None:
    """What runs before a transfer step's recording and eager steps: nothing (no gradient accumulates in a
    parameter: the guidance's gradient is returned by ``torch.autograd.grad``)."""
