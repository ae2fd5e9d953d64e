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
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention import capture_token_maps, cross_attention_layers, install_processors, swapped_processors
from ..concept import Concept
from ..errors import InputError, ModelError, TrainingError
from ..imaging import check_mask
from ..sampling import (SamplingConfig, check_prompt, chunks, concept_applied, decode_batches, encode_prompt, opt,
                        seed_batches, token_index)
from ..tokens import add_placeholders, concept_embedding, initializer_embedding, token_positions

log = logging.getLogger(__name__)

#: The SD1.x inpainting checkpoint (SD1.5-inpainting, formerly runwayml/stable-diffusion-inpainting): the
#: inpainting counterpart of the paper's SD1.4.
DEFAULT_INPAINT_MODEL = "stable-diffusion-v1-5/stable-diffusion-inpainting"


# ---------------------------------------------------------------------------------------------- config


@dataclass
class RealFillConfig:
    """Hyper-parameters of RealFill concept learning (paper's adaptation); see the module's recipe table."""

    object_class: str = opt("object", "OBJECT, the class of the object that carries the concept (metadata only: "
                                      "RealFill's prompt does not name it)")
    prompt: str | None = opt(None, "training prompt with the placeholder (default: 'a photo of <v*>', RealFill's "
                                   "'a photo of sks')")
    placeholder: str = opt("<v*>", "the new token v*")
    initializer: str = opt("pattern", "a single-token word whose embedding initialises v*")
    steps: int = opt(2000, "optimisation steps (RealFill: 2000)")
    batch_size: int = opt(16, "samples per step (RealFill: 16)")
    micro_batch: int | None = opt(None, "run each step in chunks of this many samples (gradient accumulation, same "
                                        "result up to float rounding; saves memory)")
    lr: float = opt(1e-5, "learning rate of the cross-attention K/V (Custom Diffusion's, for full matrices)")
    token_lr: float | None = opt(None, "learning rate of the token embedding (default: --lr)")
    optimizer: str = opt("adamw", "adamw (RealFill) or adam", choices=("adam", "adamw"))
    weight_decay: float = opt(1e-2, "AdamW weight decay (RealFill: 1e-2)")
    grad_clip: float | None = opt(1.0, "clip the gradient norm (RealFill: 1.0)")
    prompt_dropout: float = opt(0.1, "probability of training a sample with the empty prompt (RealFill: 0.1)")
    full_mask_p: float = opt(0.1, "probability of an all-ones inpainting mask (RealFill: 0.1)")
    max_rectangles: int = opt(29, "random masks have 1..N rectangles (RealFill: 29)")
    invert_p: float = opt(0.5, "probability of inverting a random mask (RealFill: 0.5)")
    loss_region: str = opt("mask", "where the loss counts: mask (M_s, the concept: paper's adaptation) or image "
                                   "(everywhere, as RealFill's reference images)", choices=("mask", "image"))
    resize_crop: bool = opt(True, "RealFill's augmentation: random resize to [R, 1.125 R], random crop to R")
    mask_threshold: float = opt(0.5, "non-binary masks are thresholded at this value")
    seed: int = opt(0, "random seed (masks, crops, timesteps, noise, prompt dropout)")
    checkpoint_every: int = opt(100, "save a resumable checkpoint every N steps (0: never)")
    recipe: str = "realfill"

    def check(self, n_tokens: int = 1) -> None:
        if n_tokens != 1:
            raise InputError("RealFill learns one concept per run: give one mask per image")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("--steps and --batch-size must be >= 1")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise InputError(f"--micro-batch must be >= 1, got {self.micro_batch}")
        if self.lr <= 0 or (self.token_lr is not None and self.token_lr < 0):
            raise InputError("learning rates must be positive")
        for name in ("prompt_dropout", "full_mask_p", "invert_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"--{name.replace('_', '-')} must be in [0, 1]")
        if self.max_rectangles < 1:
            raise InputError(f"--max-rectangles must be >= 1, got {self.max_rectangles}")
        if self.placeholder not in self.train_prompt():
            raise InputError(f"prompt {self.train_prompt()!r} does not contain the placeholder {self.placeholder}")

    def train_prompt(self) -> str:
        return self.prompt if self.prompt is not None else f"a photo of {self.placeholder}"


def make_config(**overrides) -> RealFillConfig:
    """A :class:`RealFillConfig` with explicit overrides (None values are ignored)."""
    names = {f.name for f in fields(RealFillConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise InputError(f"option(s) {', '.join('--' + u.replace('_', '-') for u in sorted(unknown))} do not apply "
                         "to RealFill")
    return RealFillConfig(**{k: v for k, v in overrides.items() if v is not None})


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
        backbone: an inpainting :class:`clic.models.Backbone` (9-channel UNet), modified in place.
        images: ``(3, R, R)`` source images in [-1, 1]; masks: ``(1, R, R)`` binary M_s, one per image.
    """
    from ..learn import _save_checkpoint, log_step, open_run  # shared with clic.learn

    cfg = cfg or RealFillConfig()
    if len(images) != len(masks) or not images:
        raise InputError("give one mask per source image")
    cfg.check(masks[0].shape[0])
    if not backbone.is_inpainting:
        raise ModelError(f"RealFill needs an inpainting model (9-channel UNet); {backbone.model_id} has "
                         f"{backbone.unet.config.in_channels} input channels (try --model {DEFAULT_INPAINT_MODEL}, "
                         "or `clic make-model tiny-inpaint DIR` offline)")
    device, size = backbone.device, backbone.resolution
    prompt = cfg.train_prompt()

    # 1. The new token and trainable cross-attention K/V copies (Custom Diffusion's parameter set).
    init = initializer_embedding(backbone, cfg.initializer)[None]
    token_ids = add_placeholders(backbone, [cfg.placeholder], init)
    embedding = concept_embedding(backbone.text_encoder)
    processors = install_processors(backbone.unet, train_kv=True)
    attn_params = [p for proc in processors.values() for p in proc.parameters()]
    for p in attn_params:
        p.requires_grad_(True)
    embedding.new.requires_grad_(True)
    params = [embedding.new] + attn_params
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls([{"params": [embedding.new], "lr": cfg.token_lr if cfg.token_lr is not None else cfg.lr},
                         {"params": attn_params, "lr": cfg.lr}], weight_decay=cfg.weight_decay)

    # 2. Constants: source pixels, loss weights W (M_s or ones), both prompts.
    pixels = torch.stack([torch.as_tensor(im).float() for im in images]).to(device)      # (N, 3, R, R)
    weights = torch.stack([(torch.as_tensor(m).float() > cfg.mask_threshold).float() for m in masks]).to(device)
    if cfg.loss_region == "image":
        weights = torch.ones_like(weights)
    text_ids = backbone.tokenize([prompt, ""])                                           # row 1: dropped prompt
    token_positions(text_ids[:1], token_ids, prompt)                                      # the prompt holds v*
    scheduler = backbone.training_scheduler()
    num_t = scheduler.config.num_train_timesteps
    unet_dtype = backbone.unet.dtype
    micro = cfg.micro_batch or cfg.batch_size

    # 3. Resume.
    cfg_json = json.dumps(asdict(cfg), sort_keys=True, default=str)
    generator = torch.Generator().manual_seed(cfg.seed)
    ckpt, start, history, log_file = open_run(out_path, log_path, resume, params, optimizer, generator, cfg_json)

    # 4. The loop.
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="learning v* (RealFill)", unit="step")
    last_good = None
    try:
        for step in range(start + 1, cfg.steps + 1):
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

            # 4b. Forward and backward, in micro-batches (the loss is a mean over the whole batch).
            loss_value = 0.0
            for idx in chunks(list(range(cfg.batch_size)), micro):
                text = backbone.encode_text(text_ids[dropped[idx]])
                x_in = inpainting_input(x_t[idx], m_lat[idx], cond[idx]).to(unet_dtype)
                pred = backbone.unet(x_in, t[idx], text.to(unet_dtype)).sample.float()
                loss = realfill_loss(pred, target[idx], w_lat[idx]) * (len(idx) / cfg.batch_size)
                if not torch.isfinite(loss):
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    raise TrainingError(f"loss became {loss.item()} at step {step}; {where} (try a lower --lr)")
                loss.backward()
                loss_value += loss.item()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            record = {"step": step, "loss": loss_value, "l_realfill": loss_value}
            log_step(record, history, log_file, bar, ("loss",))
            if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_checkpoint(ckpt, step, params, optimizer, generator, cfg_json)
                last_good = ckpt
            if callback:
                callback(step, record)
    finally:
        bar.close()
        if log_file:
            log_file.close()

    for p in params:
        p.requires_grad_(False)
    concept = Concept.from_training(
        backbone, [cfg.placeholder], embedding.new[-1:], processors, method="realfill", prompt=prompt,
        object_class=cfg.object_class, initializer=cfg.initializer, config=asdict(cfg),
        final_losses=history[-1] if history else {})
    if out_path:
        concept.save(out_path)
        if ckpt is not None and ckpt.is_file():
            ckpt.unlink()
    return RealFillResult(concept, history, processors)


# ---------------------------------------------------------------------------------------------- transfer


@dataclass
class InpaintConfig(SamplingConfig):
    """Options of RealFill's transfer (inpainting the target mask); defaults from RealFill's ``infer.py``."""

    steps: int = opt(200, "denoising steps (RealFill infer.py: 200)")
    guidance_scale: float = opt(1.0, "classifier-free guidance scale (RealFill infer.py: 1, i.e. off)")
    scheduler: str = opt("ddpm", "sampler (RealFill infer.py: ddpm)", choices=("ddim", "ddpm", "euler",
                                                                               "euler-ancestral", "dpm-solver"))
    prompt: str | None = opt(None, "prompt with the concept's token (default: the training prompt, "
                                   "'a photo of <v*>')")
    composite: bool = opt(True, "paste the result onto the target with the mask dilated 3x3 and box-blurred "
                                "(RealFill infer.py)")
    attn_blocks: tuple[str, ...] = opt(("up",), "UNet blocks whose cross-attention maps of v* are recorded")
    mask_threshold: float = opt(0.5, "a non-binary target mask is thresholded at this value")

    def check(self) -> None:
        self.check_sampling()
        if not 0.0 < self.mask_threshold < 1.0:
            raise InputError(f"--mask-threshold must be in (0, 1), got {self.mask_threshold}")


def make_inpaint_config(**overrides) -> InpaintConfig:
    names = {f.name for f in fields(InpaintConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise InputError(f"option(s) {', '.join('--' + u.replace('_', '-') for u in sorted(unknown))} do not apply "
                         "to RealFill's transfer")
    return InpaintConfig(**{k: v for k, v in overrides.items() if v is not None})


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


def _denoise(backbone, scheduler, x, steps, text, mask_lat, masked_lat, guidance_scale, extra, layers, index, bar,
             callback=None, info=None):
    """Steps ``steps`` of the inpainting loop with whatever processors are installed. ``text`` holds [uncond; cond]
    rows (CFG) or cond rows; returns the latents and CA(v*) of the conditional rows per step ``(S, B, T, h, w)``."""
    batch = x.shape[0]
    do_cfg = text.shape[0] == 2 * batch
    cond_in = torch.cat([mask_lat, masked_lat], 1)
    cond_in = torch.cat([cond_in] * 2) if do_cfg else cond_in
    maps = []
    for i in steps:
        t = scheduler.timesteps[i]
        x_in = scheduler.scale_model_input(torch.cat([x] * 2) if do_cfg else x, t)
        x_in = torch.cat([x_in, cond_in.to(x_in.dtype)], 1).to(backbone.unet.dtype)
        with capture_token_maps(backbone.unet, index, layers, tuple(x.shape[-2:])) as capture:
            out = backbone.unet(x_in, t, encoder_hidden_states=text).sample.float()
        if layers:
            maps.append(capture.maps()[-batch:].float().cpu())
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(out, t, x, **extra).prev_sample.float()
        bar.update(1)
        if callback is not None:
            callback({**(info or {}), "step": i, "timestep": int(t), "latents": x})
    return x, (torch.stack(maps) if maps else torch.zeros(0))


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

    with concept_applied(backbone, concept):
        # 2. Encode the prompt; find v*
        text = encode_prompt(backbone, prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        index = token_index(backbone, prompt, tokens)
        layers = cross_attention_layers(backbone.unet, cfg.attn_blocks)

        latents, maps, timesteps = [], [], []
        # 3. Prepare latents (pure noise: strength 1), then the mask conditioning (same generator order as the stock
        #    pipeline: noise first, then the masked-image latent sample)
        for b in seed_batches(backbone, cfg, seeds, "inpaint", progress):
            mask_lat, masked_lat = _conditioning(backbone, target, mask, b.generators)
            # 4. Denoising loop
            x, m = _denoise(backbone, b.scheduler, b.latents, range(cfg.steps),
                            text.repeat_interleave(len(b.seeds), 0), mask_lat, masked_lat, cfg.guidance_scale,
                            b.extra, layers, index, b.bar, callback, {"seeds": b.seeds})
            latents.append(x)
            maps.append(m)
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
    from ..generate import GenerateConfig, GenerateResult, fill_prompt

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

    with concept_applied(backbone, concept) as (base_procs, _):
        text = encode_prompt(backbone, prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        base_text = encode_prompt(backbone, base_prompt, cfg.negative_prompt, 1, cfg.do_cfg)
        latents = []
        for b in seed_batches(backbone, cfg, seeds, "generate", progress):
            batch = len(b.seeds)
            mask_lat, masked_lat = _conditioning(backbone, blank.to(backbone.device), full.to(backbone.device),
                                                 b.generators)
            x = b.latents
            if t_s:
                with swapped_processors(backbone.unet, base_procs):
                    x, _ = _denoise(backbone, b.scheduler, x, range(t_s), base_text.repeat_interleave(batch, 0),
                                    mask_lat, masked_lat, cfg.guidance_scale, b.extra, [], None, b.bar)
            x, _ = _denoise(backbone, b.scheduler, x, range(t_s, cfg.steps), text.repeat_interleave(batch, 0),
                            mask_lat, masked_lat, cfg.guidance_scale, b.extra, [], None, b.bar)
            latents.append(x)
        latents = torch.cat(latents)
        images = decode_batches(backbone, latents, cfg.batch_size)
    return GenerateResult(images.cpu(), latents.cpu(), seeds, prompt, base_prompt, t_s)
