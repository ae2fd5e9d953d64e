"""RealFill (Tang et al., SIGGRAPH 2024) adapted to concept transfer, as the CLiC paper compares it (sec. 4.2).

RealFill fine-tunes an *inpainting* Stable Diffusion on a few reference images under random masks, then fills a
hole in a target image. The paper adapts it: "we learn the concept delineated by the mask on the source image and
optimize the cross-attention blocks of the Inpainting Stable Diffusion. For transfer, we use the fine-tuned UNet
and inpaint the masked regions of the target image using the token acquired from the concept".

Learning (:func:`learn_realfill`), per step, a batch of B samples of the source image(s):

    I        = random resize to [R, 1.125 R] and random crop to R of the source (image and M_s alike)
    M_rand   = random_masks(): 1-29 rectangles, inverted with p 0.5, all-ones with p 0.1 (1 = to inpaint)
    x_0      = E(I),   c_img = E(I * (M_rand < 0.5)),   m = M_rand at latent size (nearest)
    x_t      = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
    eps_hat  = eps_theta([x_t, m, c_img], t, "a photo of <v*>")        (prompt dropped to "" with p 0.1)
    l        = mean(W * (eps_hat - eps)^2),  W = M_s at latent size    realfill_loss(): RealFill's weighted MSE

Trained: the token v* and fp32 copies of the cross-attention K/V of the inpainting UNet (the paper's adaptation;
RealFill itself trains LoRA on the UNet and text encoder). Stored as an ordinary concept file (method "realfill").

Transfer (:func:`inpaint`): the StableDiffusionInpaintPipeline loop (pure noise, UNet input [x_t, mask,
E(target * (1 - M_tg))]) with the concept applied, then RealFill's paste: the mask dilated 3x3 and box-blurred
(radius 1) is the alpha of a composite onto the target. With ``composite=False`` and one seed the result equals a
stock ``StableDiffusionInpaintPipeline`` run (see the tests).

Recipe (defaults) vs. RealFill's published one (thuanz123/realfill, diffusers research_projects/realfill):

=========================  ======================================  ==========================================
                           here (paper's adaptation)               RealFill
=========================  ======================================  ==========================================
base model                 SD1.x inpainting (paper: SD1.4 family)  SD2-inpainting
trained                    token v* + cross-attention K/V          LoRA (rank 8) on UNet attention + text enc.
learning rate              1e-5 (K/V and token; Custom Diffusion's  2e-4 UNet LoRA, 4e-5 text-encoder LoRA
                           lr for full K/V matrices)
optimizer                  AdamW, wd 1e-2, grad clip 1             same
steps x batch              2000 x 16                               same
prompt                     "a photo of <v*>", dropped 10%          "a photo of sks", dropped 10%
random masks               1-29 rectangles (3-25% of R), inverted  same
                           p 0.5, all-ones p 0.1
loss weight W              M_s (the concept region; 0 elsewhere)   0 inside the target's hole, 1 elsewhere
augmentation               random resize [R, 1.125R] + crop        same
VAE latents                posterior mean                          posterior sample
sampling                   DDPM, 200 steps, CFG 1 (off)            same (infer.py), 16 samples
paste                      3x3 dilation + box blur 1, composite    same
=========================  ======================================  ==========================================
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention import cross_attention_layers, swapped_processors
from ..checks import FiniteWatch
from ..concept import Concept, applied_concept
from ..config import GenerateConfig, InpaintConfig, RealFillConfig
from ..errors import InputError, ModelError
from ..generate import GUIDANCE_HINT, GenerateResult, fill_prompt
from ..imaging import check_mask
from ..models import DEFAULT_INPAINT_MODEL, DEFAULT_SDXL_INPAINT_MODEL
from ..runs import Run
from ..sampling import check_prompt, chunks, decode_batches, denoise, encode_prompt, seed_batches, token_index
from ..tokens import initializer_embedding, token_positions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the pieces


def random_masks(n: int, size: int, generator: torch.Generator, max_rectangles: int = 29, full_p: float = 0.1,
                 invert_p: float = 0.5) -> torch.Tensor:
    """RealFill's training masks ``(n, 1, size, size)``, 1 = region to inpaint.

    Each mask is all ones with probability ``full_p``; otherwise 1..max_rectangles rectangles of sides in
    [3%, 25%) of ``size`` (1% margin) are set to 0 in an all-ones mask, and the result is inverted with
    probability ``invert_p``.
    """
    def randint(lo: int, hi: int) -> int:                     # numpy's randint(lo, hi): lo <= k < hi
        return int(torch.randint(lo, max(hi, lo + 1), (1,), generator=generator))

    lo, hi, margin = int(0.03 * size), int(0.25 * size), int(0.01 * size)
    hi = min(hi, size - 2 * margin)
    lo = max(1, min(lo, hi - 1))
    out = torch.ones(n, 1, size, size)
    for k in range(n):
        if float(torch.rand(1, generator=generator)) < full_p:
            continue
        for _ in range(randint(1, max_rectangles + 1)):
            w, h = randint(lo, hi), randint(lo, hi)
            x, y = randint(margin, size - margin - w + 1), randint(margin, size - margin - h + 1)
            out[k, :, y:y + h, x:x + w] = 0
        if float(torch.rand(1, generator=generator)) < invert_p:
            out[k] = 1 - out[k]
    return out


def random_resize_crop(pixels: torch.Tensor, weight: torch.Tensor, generator: torch.Generator,
                       max_scale: float = 1.125) -> tuple[torch.Tensor, torch.Tensor]:
    """RealFill's ``RandomResize(R, 1.125 R)`` + ``RandomCrop(R)`` on an image ``(3, R, R)`` and its weight map
    ``(1, R, R)`` alike (bilinear for both)."""
    size = pixels.shape[-1]
    new = int(torch.randint(size, max(int(max_scale * size), size + 1), (1,), generator=generator))
    if new == size:
        return pixels, weight
    both = F.interpolate(torch.cat([pixels, weight])[None], size=(new, new), mode="bilinear", align_corners=False)[0]
    y = int(torch.randint(0, new - size + 1, (1,), generator=generator))
    x = int(torch.randint(0, new - size + 1, (1,), generator=generator))
    both = both[:, y:y + size, x:x + size]
    return both[:3], both[3:]


def inpainting_input(x_t: torch.Tensor, mask_latent: torch.Tensor, masked_latent: torch.Tensor) -> torch.Tensor:
    """The 9-channel UNet input of SD inpainting: ``[x_t, mask, E(masked image)]`` along channels."""
    return torch.cat([x_t, mask_latent.to(x_t.dtype), masked_latent.to(x_t.dtype)], dim=1)


def realfill_loss(eps_pred: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RealFill's loss: ``mean(W * (eps_hat - eps)^2)`` over all elements (weights broadcast over channels; not
    normalised by the weight's area)."""
    diff2 = (eps_pred.float() - eps.float()) ** 2
    return (weight.float().expand_as(diff2) * diff2).mean()


# ---------------------------------------------------------------------------------------------- learning


@dataclass
class RealFillResult:
    concept: Concept
    history: list[dict]
    processors: dict


def learn_realfill(backbone, images: list[torch.Tensor], masks: list[torch.Tensor], cfg: RealFillConfig | None = None,
                   out_path=None, log_path=None, resume: bool = False, progress: bool = True,
                   callback: Callable[[int, dict], None] | None = None) -> RealFillResult:
    """Learn v* with RealFill's objective on an inpainting backbone (same signature as :func:`clic.learn.learn`).

    Args:
        backbone: an inpainting :class:`clic.models.Backbone` (9-channel UNet); left as it was found.
        images: ``(3, R, R)`` source images in [-1, 1]; masks: ``(1, R, R)`` binary M_s, one per image.
    """
    cfg = cfg or RealFillConfig()
    if len(images) != len(masks) or not images:
        raise InputError("give one mask per source image")
    cfg.check(masks[0].shape[0])
    if not backbone.is_inpainting:
        xl = backbone.family == "sdxl"
        raise ModelError(f"RealFill needs an inpainting model (9-channel UNet); {backbone.model_id} has "
                         f"{backbone.unet.config.in_channels} input channels (try --model "
                         f"{DEFAULT_SDXL_INPAINT_MODEL if xl else DEFAULT_INPAINT_MODEL}, or `clic make-model "
                         f"{'tiny-sdxl-inpaint' if xl else 'tiny-inpaint'} DIR` offline)")
    device, size = backbone.device, backbone.resolution
    prompt = cfg.train_prompt()

    # 1. The new token and trainable cross-attention K/V copies (Custom Diffusion's parameter set).
    start = Concept.untrained([cfg.placeholder], initializer_embedding(backbone, cfg.initializer)[None])
    with applied_concept(backbone, start, train="kv", train_token=True) as applied:
        attn_params = applied.attention_parameters
        params = applied.token_parameters + attn_params
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls([{"params": applied.token_parameters,
                              "lr": cfg.token_lr if cfg.token_lr is not None else cfg.lr},
                             {"params": attn_params, "lr": cfg.lr}], weight_decay=cfg.weight_decay)

        # 2. Constants: source pixels, loss weights W (M_s or ones), both prompts.
        pixels = torch.stack([torch.as_tensor(im).float() for im in images]).to(device)      # (N, 3, R, R)
        weights = torch.stack([(torch.as_tensor(m).float() > cfg.mask_threshold).float() for m in masks]).to(device)
        if cfg.loss_region == "image":
            weights = torch.ones_like(weights)
        text_ids = backbone.tokenize([prompt, ""])                                           # row 1: dropped prompt
        token_positions(text_ids[:1], applied.token_ids, prompt)                              # the prompt holds v*
        scheduler = backbone.training_scheduler()
        num_t = scheduler.config.num_train_timesteps
        unet_dtype = backbone.unet.dtype
        micro = cfg.micro_batch or cfg.batch_size

        # 3. The run (resumed from its checkpoint if asked).
        generator = torch.Generator().manual_seed(cfg.seed)
        run = Run(out_path, log_path, resume, params, optimizer, generator, json.dumps(asdict(cfg), sort_keys=True,
                  default=str), cfg.steps, cfg.checkpoint_every, ("loss", "l_realfill"), 1, "learning v* (RealFill)",
                  progress, callback)

        # 4. The loop.
        with run:
            for step in run.steps():
                # 4a. A batch: augmented source, random inpainting masks, timesteps, noise, prompt dropout.
                with torch.no_grad():
                    picks = torch.randint(len(images), (cfg.batch_size,), generator=generator).tolist()
                    batch_px, batch_w = [], []
                    for k in picks:
                        px, w = pixels[k], weights[k]
                        if cfg.resize_crop:
                            px, w = random_resize_crop(px, w, generator)
                        batch_px.append(px)
                        batch_w.append(w)
                    batch_px, batch_w = torch.stack(batch_px), torch.stack(batch_w)
                    m_rand = random_masks(cfg.batch_size, size, generator, cfg.max_rectangles, cfg.full_mask_p,
                                          cfg.invert_p).to(device)
                    x0 = backbone.encode_image(batch_px)                                         # (B, C, h, w)
                    cond = backbone.encode_image(batch_px * (m_rand < 0.5))                       # E(masked image)
                    hw = tuple(x0.shape[-2:])
                    m_lat = F.interpolate(m_rand, size=hw)                                        # nearest, as RealFill
                    w_lat = F.interpolate((batch_w > 0.5).float(), size=hw)
                t = torch.randint(0, num_t, (cfg.batch_size,), generator=generator).to(device)
                eps = torch.randn(x0.shape, generator=generator).to(device)
                dropped = (torch.rand(cfg.batch_size, generator=generator) < cfg.prompt_dropout).long().to(device)
                x_t = scheduler.add_noise(x0, eps, t)
                target = eps if backbone.prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)

                # 4b. Forward and backward, in micro-batches (the loss is a mean over the whole batch); a non-finite
                # loss stops the run before it reaches the weights.
                loss_value = 0.0
                for idx in chunks(list(range(cfg.batch_size)), micro):
                    text = backbone.encode_text(text_ids[dropped[idx]])
                    x_in = inpainting_input(x_t[idx], m_lat[idx], cond[idx]).to(unet_dtype)
                    pred = backbone.unet(x_in, t[idx], **text.to(unet_dtype).unet_kwargs()).sample.float()
                    loss = realfill_loss(pred, target[idx], w_lat[idx]) * (len(idx) / cfg.batch_size)
                    run.check_finite(loss.item(), step)
                    loss.backward()
                    loss_value += loss.item()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if run.checkpoint_due(step):
                    run.save_checkpoint(step)
                run.report([{"step": step, "loss": loss_value, "l_realfill": loss_value}])

        for p in params:
            p.requires_grad_(False)
        concept = Concept.from_training(
            backbone, [cfg.placeholder], applied.token_rows, applied.processors, method="realfill", prompt=prompt,
            object_class=cfg.object_class, initializer=cfg.initializer, config=asdict(cfg),
            final_losses=run.history[-1] if run.history else {})
    if out_path:
        concept.save(out_path)
        run.finish()
    return RealFillResult(concept, run.history, applied.processors)


# ---------------------------------------------------------------------------------------------- transfer


def paste_alpha(mask: torch.Tensor) -> torch.Tensor:
    """RealFill's composite alpha ``(1, 1, R, R)``: ``MaxFilter(3)`` then ``BoxBlur(1)`` of the mask (edges
    replicated, as PIL does)."""
    m = mask.float().reshape(1, 1, *mask.shape[-2:])
    m = F.max_pool2d(F.pad(m, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return F.avg_pool2d(F.pad(m, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


@dataclass
class InpaintResult:
    """Outputs of :func:`inpaint` (the fields :class:`clic.transfer.TransferResult` shares with it)."""

    images: torch.Tensor        # (N, 3, R, R) in [-1, 1]: results (pasted onto the target unless composite is off)
    decoded: torch.Tensor       # (N, 3, R, R): VAE decoding of the final latents
    latents: torch.Tensor       # (N, C, h, w)
    target: torch.Tensor        # (3, R, R)
    mask: torch.Tensor          # (1, R, R) binary M_tg
    alpha: torch.Tensor         # (1, 1, R, R) the paste's alpha
    attention: torch.Tensor     # (S, N, T, h, w): CA(v*, x_t) of the conditional branch at every step
    seeds: list[int]
    prompt: str
    tokens: list[str]
    timesteps: list[int] = field(default_factory=list)


def _check_inpainting(backbone) -> None:
    if not backbone.is_inpainting:
        raise ModelError(f"RealFill concepts need their inpainting base model; {backbone.model_id} has a "
                         f"{backbone.unet.config.in_channels}-channel UNet")


def _conditioning(backbone, image: torch.Tensor, mask: torch.Tensor, generators: list[torch.Generator]):
    """Mask at latent size (nearest) and E(image * (mask < 0.5)) sampled with each image's generator, as
    ``StableDiffusionInpaintPipeline.prepare_mask_latents`` (one sample per seed, so a result depends on its seed
    only, not on the batch)."""
    hw = (backbone.latent_size, backbone.latent_size)
    mask_lat = F.interpolate(mask.reshape(1, 1, *mask.shape[-2:]).float(), size=hw).to(backbone.device)
    masked = (image * (mask < 0.5)).reshape(1, 3, *image.shape[-2:]).to(backbone.device, backbone.vae.dtype)
    dist = backbone.vae.encode(masked).latent_dist
    masked_lat = torch.cat([dist.sample(generator=g) for g in generators]).float() * backbone.vae.config.scaling_factor
    return mask_lat.expand(len(generators), -1, -1, -1), masked_lat


@torch.no_grad()
def inpaint(backbone, concept, target: torch.Tensor, mask: torch.Tensor, cfg: InpaintConfig | None = None,
            progress: bool = True, callback: Callable[[dict], None] | None = None) -> InpaintResult:
    """RealFill's transfer: inpaint ``mask`` of ``target`` with the concept applied, one result per seed.

    Args:
        backbone: the inpainting base model the concept was learned on; processors are restored afterwards.
        concept: a :class:`clic.concept.Concept` made by :func:`learn_realfill`.
        target: ``(3, R, R)`` in [-1, 1]; mask: ``(1, R, R)`` or ``(R, R)`` (1 = region to fill).
    """
    cfg = cfg or InpaintConfig()

    # 1. Check inputs
    cfg.check()
    _check_inpainting(backbone)
    seeds = cfg.seed_list()
    prompt = cfg.prompt if cfg.prompt is not None else concept.meta.get("prompt", "")
    tokens = check_prompt(prompt, concept.tokens)
    size = backbone.resolution
    target = torch.as_tensor(target).float()
    if target.shape != (3, size, size):
        raise InputError(f"target must be a (3, {size}, {size}) image in [-1, 1], got {tuple(target.shape)}")
    mask = (torch.as_tensor(mask).float().reshape(1, *target.shape[-2:]) > cfg.mask_threshold).float()
    check_mask(mask, "target mask")
    target, mask = target.to(backbone.device), mask.to(backbone.device)

    with applied_concept(backbone, concept):
        # 2. Encode the prompt; find v*
        text = encode_prompt(backbone, prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        index = token_index(backbone, prompt, tokens)
        layers = cross_attention_layers(backbone.unet, cfg.attn_blocks)

        latents, maps, timesteps = [], [], []
        # 3. Prepare latents (pure noise: strength 1), then the mask conditioning (same generator order as the stock
        #    pipeline: noise first, then the masked-image latent sample)
        for b in seed_batches(backbone, cfg, seeds, "inpaint", progress):
            condition = torch.cat(_conditioning(backbone, target, mask, b.generators), 1)
            # 4. Denoising loop
            watch = FiniteWatch("the inpainted latents", GUIDANCE_HINT)
            x, m = denoise(backbone, b.scheduler, b.latents, range(cfg.steps), text.repeat_interleave(len(b.seeds)),
                           cfg, b.extra, b.bar, callback, {"seeds": b.seeds}, condition, layers, index, watch)
            watch.check()
            latents.append(x)
            maps.append(torch.stack(m).cpu() if m else torch.zeros(0))
            timesteps = [int(t) for t in b.scheduler.timesteps]
        latents = torch.cat(latents)

        # 5. Decode; paste onto the target
        decoded = decode_batches(backbone, latents, cfg.batch_size)
        alpha = paste_alpha(mask)
        images = alpha * decoded + (1 - alpha) * target[None] if cfg.composite else decoded
    return InpaintResult(images.cpu(), decoded.cpu(), latents.cpu(), target.cpu(), mask.cpu(), alpha.cpu(),
                         torch.cat(maps, 1), seeds, prompt, tokens, timesteps)


@torch.no_grad()
def generate_inpainting(backbone, concept, cfg=None, progress: bool = True):
    """Generation with a RealFill concept: the inpainting model with an all-ones mask (nothing kept) is a
    text-to-image model; sampling as :func:`clic.generate.generate` (two stages when ``cfg.t_s`` > 0)."""
    cfg = cfg or GenerateConfig(base_steps=0)
    cfg.check()
    _check_inpainting(backbone)
    seeds = cfg.seed_list()
    object_class = cfg.object_class or concept.meta.get("object_class") or "object"
    prompt = fill_prompt(cfg.prompt, object_class, concept.tokens)
    base_prompt = fill_prompt(cfg.base_prompt, object_class, concept.tokens)
    check_prompt(prompt, concept.tokens)
    size = backbone.resolution
    blank, full = torch.zeros(3, size, size), torch.ones(1, size, size)
    t_s = cfg.t_s                                                   # base-stage steps

    with applied_concept(backbone, concept) as applied:
        text = encode_prompt(backbone, prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        base_text = encode_prompt(backbone, base_prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        latents = []
        for b in seed_batches(backbone, cfg, seeds, "generate", progress):
            batch = len(b.seeds)
            condition = torch.cat(_conditioning(backbone, blank.to(backbone.device), full.to(backbone.device),
                                                b.generators), 1)
            x, watch = b.latents, FiniteWatch("the generated latents", GUIDANCE_HINT)
            if t_s:
                with swapped_processors(backbone.unet, applied.base_processors):
                    x, _ = denoise(backbone, b.scheduler, x, range(t_s), base_text.repeat_interleave(batch), cfg,
                                   b.extra, b.bar, condition=condition, watch=watch)
            x, _ = denoise(backbone, b.scheduler, x, range(t_s, cfg.steps), text.repeat_interleave(batch), cfg,
                           b.extra, b.bar, condition=condition, watch=watch)
            watch.check()
            latents.append(x)
        latents = torch.cat(latents)
        images = decode_batches(backbone, latents, cfg.batch_size)
    return GenerateResult(images.cpu(), latents.cpu(), seeds, prompt, base_prompt, t_s)
