"""In-context concept learning (paper sec. 3.1, eq. 1-5).

One straight training loop, :func:`learn`. Per step, with one timestep t and one noise eps shared by all
branches (as the official code does):

    x_t      = sqrt(a_t) x_0 + sqrt(1 - a_t) eps                        (x_0: VAE latent of the source, cached)
    context  : eps_theta(x_t, c, t),  c = "a chair with <v*> style"      -> l_con (eq. 3, soft mask eq. 2)
               and CA_theta(v*, x_t) from the up-block cross-attention   -> l_att (eq. 1)
    RoI      : eps_theta(M_s * x_t, c*, t), c* = "a photo of <v*>"       -> l_RoI (eq. 4)
    l_tot    = l_con + lambda_att l_att + lambda_RoI l_RoI               (eq. 5)

The context and RoI branches run as one UNet batch. Trained: the placeholder embedding(s) and fp32 copies of
the cross-attention K/V (Custom Diffusion), optionally Q/out (official code). Nothing else requires grad, and the
backbone is left as it was found (:func:`clic.concept.applied_concept`).

The steps' pieces are functions of their own, for the loop here and for other loops that reuse them (the speed
bench's reference computation): :func:`prepare_sources` (what stays constant), :func:`draw` (the step's random
numbers), :func:`noised_batch` (the UNet inputs), :func:`step_losses` (eq. 1-5).

With ``--cuda-graphs capture`` the same step runs over fixed tensors (:class:`StaticStep`) and is recorded once as
a CUDA graph (:func:`capture_loop`, :mod:`clic.capture`).

Every random number comes from one :class:`clic.draws.Draws` source, by name (default: seeded with ``cfg.seed``); a
caller can inject another (``learn(..., draws=...)``) to feed two runs the same draws.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch

from .attention import capture_token_maps, cross_attention_layers, start_token_detached
from .capture import StepGraph
from .concept import AppliedConcept, Concept, applied_concept
from .config import SPEED, LearnConfig
from .draws import Draws, SeededDraws
from .errors import InputError
from .imaging import resize_mask
from .losses import attention_loss, context_loss, roi_loss, soft_mask, total_loss, valid_region
from .models import TextConditioning
from .runs import Run
from .speed import mark_step, speed_levers, sync_interval, to_device, with_cuda_graphs
from .tokens import initializer_embedding, token_positions

log = logging.getLogger(__name__)

TERMS = ("loss", "l_con", "l_att", "l_roi")     # the values a step logs, in this order


@dataclass
class LearnResult:
    concept: Concept
    history: list[dict]
    processors: dict            # the trained cross-attention processors (no longer on the backbone)


def learn(backbone, images: list[torch.Tensor], masks: list[torch.Tensor], cfg: LearnConfig, out_path=None,
          log_path=None, resume: bool = False, progress: bool = True,
          callback: Callable[[int, dict], None] | None = None,
          init_vectors: torch.Tensor | None = None, draws: Draws | None = None) -> LearnResult:
    """Learn v* from source images and their RoI masks.

    Args:
        backbone: a :class:`clic.models.Backbone`; left as it was found (tokens, processors, ``requires_grad``).
        images: ``(3, R, R)`` tensors in [-1, 1] at the model resolution R.
        masks: ``(n_tokens, R, R)`` binary masks, one channel per concept token (usually 1).
        out_path: where the concept file goes; also names the checkpoint (``<out>.ckpt``).
        log_path: JSON-lines log of the loss terms per step.
        resume: continue from ``<out>.ckpt`` if it exists (same result as an uninterrupted run).
        callback: called as ``callback(step, record)`` for every step, when its loss values are read back from the
            device: at once on the CPU, in bursts of ``sync_every`` steps on a GPU (:func:`clic.runs.reads_losses`).
        init_vectors: ``(n_tokens, dim)`` initial embeddings (e.g. w* starts from the learned v*, sec. 3.3);
            default: the embedding of ``cfg.initializer``. With ``cfg.train == "token"`` the cross-attention
            processors installed on the backbone are kept (e.g. a learned concept's K/V, for w*).
        draws: the source of every random number (:mod:`clic.draws`: image, flip, timestep, noise, RoI prompt,
            posterior samples, by step); default :class:`~clic.draws.SeededDraws` of ``cfg.seed``. A checkpoint
            saves and restores its ``generator``.
    """
    n_tok = check_inputs(images, masks, cfg)
    cfg = with_cuda_graphs(with_attention_level(backbone, cfg), backbone.device)
    start = Concept.untrained(cfg.tokens(n_tok), initial_vectors(backbone, cfg, n_tok, init_vectors))

    with applied_concept(backbone, start, train=cfg.train, train_token=cfg.train_token) as applied, \
            start_token_detached(applied.processors.values(), not cfg.start_token_grad), speed_levers(backbone, cfg):
        # 1. Everything constant once (latents, masks, token positions), the optimiser, the run's files.
        src = prepare_sources(backbone, images, masks, cfg, applied)
        params, optimizer = make_optimizer(applied, cfg, backbone.device)
        draws = draws if draws is not None else SeededDraws(cfg.seed)
        run = Run(out_path, log_path, resume, params, optimizer, draws.generator, config_json(cfg), cfg.steps,
                  cfg.checkpoint_every, TERMS, sync_interval(cfg, backbone.device), "learning v*", progress, callback)

        # 2. The loop: a batch, the losses, an optimiser step (or the same step as one CUDA graph: capture_loop).
        with run:
            if cfg.cuda_graphs == "capture":
                capture_loop(backbone, src, cfg, applied, params, optimizer, draws, run)
            else:
                for step in run.steps():
                    mark_step(cfg)
                    token_warmup(optimizer, applied, cfg, step, run.start)
                    noise = draw(src, cfg, draws, step)
                    run.add(step, forward_backward(backbone, src, cfg, noise), t=int(noise.t))
                    saves = run.checkpoint_due(step)
                    # the only wait for the device: the pending steps' loss values in one copy, checked finite
                    # before this step's update (with sync_every 1 no NaN ever reaches the weights; a checkpoint
                    # holds finite steps only)
                    ready = run.read() if saves or run.read_due(step) else []
                    optimizer_step(params, optimizer, cfg)
                    optimizer.zero_grad(set_to_none=True)
                    if saves:
                        run.save_checkpoint(step)
                    run.report(ready)

        # 3. What was learned, as a concept file.
        for p in params:
            p.requires_grad_(False)
        concept = Concept.from_training(
            backbone, start.tokens, applied.token_rows, applied.processors, method=cfg.recipe,
            prompt=cfg.context_prompt(n_tok), roi_prompt=cfg.roi_prompt, object_class=cfg.object_class,
            initializer=cfg.initializer, config=asdict(cfg), final_losses=run.history[-1] if run.history else {})
    if out_path:
        concept.save(out_path)
        run.finish()
    return LearnResult(concept, run.history, applied.processors)


# ---------------------------------------------------------------------------------------------- set-up


def check_inputs(images: list[torch.Tensor], masks: list[torch.Tensor], cfg: LearnConfig) -> int:
    """The number of concept tokens (mask channels); an :class:`InputError` for inputs that do not fit."""
    if len(images) != len(masks) or not images:
        raise InputError("give one mask per source image")
    n_tok = masks[0].shape[0]
    if any(m.shape[0] != n_tok for m in masks):
        raise InputError("every source image needs the same number of masks")
    cfg.check(n_tok)
    return n_tok


def initial_vectors(backbone, cfg: LearnConfig, n_tok: int, given: torch.Tensor | None = None) -> torch.Tensor:
    """``(n_tokens, dim)``: ``given``, or the embedding of the initializer word for every token."""
    if given is None:
        given = initializer_embedding(backbone, cfg.initializer).expand(n_tok, -1).clone()
    return given.reshape(n_tok, -1)


def with_attention_level(backbone, cfg: LearnConfig) -> LearnConfig:
    """``cfg.attn_factor`` names a UNet level by its downsampling of the latent (Break-A-Scene's 16x16 maps of a
    64x64 latent: 4). A UNet without cross-attention at that level (e.g. the tiny test models) uses its coarsest
    cross-attention level instead."""
    if not cfg.use_att or cfg.attn_factor is None or cross_attention_layers(backbone.unet, cfg.attn_blocks,
                                                                            cfg.attn_factor):
        return cfg
    levels = len(backbone.unet.config.block_out_channels)
    factors = [2**k for k in range(levels) if cross_attention_layers(backbone.unet, cfg.attn_blocks, 2**k)]
    if not factors:
        raise InputError(f"no cross-attention layer in blocks {cfg.attn_blocks}")
    log.warning("no cross-attention at latent/%s in %s: l_att uses latent/%s instead", cfg.attn_factor,
                backbone.model_id, factors[-1])
    return replace(cfg, attn_factor=factors[-1])


def config_json(cfg: LearnConfig) -> str:
    """What a checkpoint must have been made with to resume: every option but the speed options and the checkpoint
    interval (they change how fast a run goes, not what it computes)."""
    skip = {f.name for f in fields(cfg) if f.metadata.get("group") == SPEED} | {"checkpoint_every"}
    return json.dumps({k: v for k, v in asdict(cfg).items() if k not in skip}, sort_keys=True, default=str)


def make_optimizer(applied: AppliedConcept, cfg: LearnConfig, device) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """(the trained parameters, Adam or AdamW over them): the token rows at ``token_lr``, the attention copies at
    ``lr``."""
    token = applied.token_parameters if cfg.train_token else []
    attention = applied.attention_parameters if cfg.train != "token" else []
    groups = []
    if token:
        groups.append({"params": token, "lr": cfg.token_lr if cfg.token_lr is not None else cfg.lr})
    if attention:
        groups.append({"params": attention, "lr": cfg.lr})
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    cuda = torch.device(device).type == "cuda"
    impl = "fused" if cfg.adam_impl == "auto" and cuda else cfg.adam_impl
    kw = {impl: True} if impl != "auto" else {}
    if cfg.cuda_graphs == "capture" and cuda:
        kw["capturable"] = True                 # the step count on the device: the update can be in a CUDA graph
    optimizer = opt_cls(groups, weight_decay=cfg.weight_decay, **kw)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return token + attention, optimizer


def token_warmup(optimizer, applied: AppliedConcept, cfg: LearnConfig, step: int, start: int) -> None:
    """Break-A-Scene's phase 1: for the first ``token_warmup_steps`` only the token trains, at its own learning rate;
    then everything at the normal ones."""
    if not cfg.token_warmup_steps or step not in (start + 1, cfg.token_warmup_steps + 1):
        return
    warm = step <= cfg.token_warmup_steps
    for group in optimizer.param_groups:
        is_token = any(group["params"][0] is p for p in applied.token_parameters)
        group["lr"] = (cfg.token_warmup_lr if warm else group["initial_lr"]) if is_token else group["initial_lr"]
    if cfg.train != "token":
        for p in applied.attention_parameters:
            p.requires_grad_(not warm)


# ---------------------------------------------------------------------------------------------- a step's pieces


@dataclass
class Sources:
    """What stays constant during learning, computed once (N source images, T tokens, P RoI prompts, h x w the latent
    size)."""

    backbone: object
    pixels: torch.Tensor                 # (N, 3, R, R) on the device
    latents: torch.Tensor                # (N, C, h, w) VAE latents (posterior mean)
    latents_flip: torch.Tensor | None    # the same of the flipped images (flip_p > 0)
    masks_lat: torch.Tensor              # (N, T, h, w) M_s at latent size
    union_lat: torch.Tensor              # (N, 1, h, w) their union (l_con's soft mask)
    roi_latents: torch.Tensor | None     # (N, T, C, h, w) the masked images' latents (roi_input "pixels")
    roi_latents_flip: torch.Tensor | None
    text_ids: torch.Tensor               # (B', L) the prompt rows: [context][RoI: P x T, prompt-major]
    pos_rows: torch.Tensor               # (B', T) where each row's tokens are (RoI row j: its own token)
    constant_text: TextConditioning | None   # the rows' text conditioning, when the token does not train
    layers: list[str]                    # the cross-attention layers of CA(v*, x_t)
    text_dtype: torch.dtype              # what the UNet's cross-attention projections compute in
    memory_format: torch.memory_format
    scheduler: object                    # the training (DDPM) scheduler
    n_images: int
    n_tokens: int
    need_context: bool                   # l_con or l_att: the batch has a context row
    posterior: dict | None = None        # posterior "sample": {flipped: (mean, std)} of the images, (N, C, h, w) each
    roi_posterior: dict | None = None    # the same of the masked images, (N, T, C, h, w) each
    valid: torch.Tensor | None = None    # (1, 1, h, w) l_con's valid region (context_border > 0)

    @property
    def hw(self) -> tuple[int, int]:
        return tuple(self.latents.shape[-2:])

    def latent(self, noise: "Noise") -> torch.Tensor:
        """x_0 of the step, ``(1, C, h, w)``: the drawn image's cached latent (flipped or not), or a posterior
        sample of it."""
        k = noise.k
        if noise.z is None:
            return (self.latents_flip if noise.flip else self.latents)[k:k + 1]
        mean, std = self.posterior[noise.flip]
        return self.backbone.posterior_sample(mean[k:k + 1], std[k:k + 1], noise.z)

    def roi_latent(self, noise: "Noise") -> torch.Tensor:
        """x_0 of l_RoI's masked images of the drawn image, ``(T, C, h, w)`` (``roi_input`` pixels)."""
        k = noise.k
        if noise.z_roi is None:
            return (self.roi_latents_flip if noise.flip else self.roi_latents)[k]
        mean, std = self.roi_posterior[noise.flip]
        return self.backbone.posterior_sample(mean[k], std[k], noise.z_roi)

    def _rows(self, rows: torch.Tensor, noise: "Noise") -> torch.Tensor:
        """The step's batch rows of ``rows`` (one per prompt row): all of them with one RoI prompt, else the
        context row and, for each token, the row of its drawn prompt."""
        if noise.roi_prompts is None:
            return rows
        off = 1 if self.need_context else 0
        picked = [off + p * self.n_tokens + j for j, p in enumerate(noise.roi_prompts)]
        parts = [rows[r:r + 1] for r in [*range(off), *picked]]                # slices: no index sent to the device
        return TextConditioning.cat(parts) if isinstance(rows, TextConditioning) else torch.cat(parts)

    def ids(self, noise: "Noise") -> torch.Tensor:
        """The token ids ``(B, L)`` of the step's batch rows."""
        return self._rows(self.text_ids, noise)

    def positions(self, noise: "Noise") -> torch.Tensor:
        """``(B, T)``: where each batch row's tokens are."""
        return self._rows(self.pos_rows, noise)

    def text(self, noise: "Noise") -> TextConditioning:
        """The rows' text conditioning: encoded every step while the token trains (its gradient flows through)."""
        if self.constant_text is not None:
            return self._rows(self.constant_text, noise)
        return self.backbone.encode_text(self.ids(noise))


@torch.no_grad()
def _encode(backbone, pixels: torch.Tensor) -> torch.Tensor:
    return backbone.encode_image(pixels)


@torch.no_grad()
def _encode_posterior(backbone, pixels: torch.Tensor, flip: bool) -> dict:
    """{False: (mean, std), True: the same of the flipped pixels (if ``flip``)}."""
    out = {False: backbone.encode_posterior(pixels)}
    if flip:
        out[True] = backbone.encode_posterior(pixels.flip(-1))
    return out


def prepare_sources(backbone, images: list[torch.Tensor], masks: list[torch.Tensor], cfg: LearnConfig,
                    applied: AppliedConcept) -> Sources:
    device, n, n_tok = backbone.device, len(images), masks[0].shape[0]
    tokens = cfg.tokens(n_tok)
    prompt = cfg.context_prompt(n_tok)
    pixels = torch.stack(images).to(device)
    sample = cfg.posterior == "sample"
    flips = cfg.flip_p > 0
    posterior = roi_posterior = None
    if sample:       # x_0 drawn at every step: the posteriors are cached, their means scaled are the latents
        posterior = _encode_posterior(backbone, pixels, flips)
        scale = backbone.vae.config.scaling_factor
        latents = posterior[False][0] * scale
        latents_flip = posterior[True][0] * scale if flips else None
    else:
        latents = _encode(backbone, pixels)                                          # (N, C, h, w)
        latents_flip = _encode(backbone, pixels.flip(-1)) if flips else None
    hw = tuple(latents.shape[-2:])
    masks_t = torch.stack(masks).float().to(device)                                  # (N, T, R, R)
    masks_lat = resize_mask(masks_t, hw, antialias=cfg.mask_antialias)               # (N, T, h, w)
    roi_latents = roi_latents_flip = None
    if cfg.use_roi and cfg.roi_input == "pixels":
        # official code: pixels outside the mask set to 0 in [-1, 1] (mid-grey), then VAE-encoded
        roi_px = (pixels[:, None] * masks_t[:, :, None]).flatten(0, 1)              # (N T, 3, R, R)
        if sample:
            roi_posterior = {f: tuple(x.unflatten(0, (n, n_tok)) for x in ms)
                             for f, ms in _encode_posterior(backbone, roi_px, flips).items()}
        else:
            roi_latents = _encode(backbone, roi_px).unflatten(0, (n, n_tok))
            if flips:
                roi_latents_flip = _encode(backbone, roi_px.flip(-1)).unflatten(0, (n, n_tok))
    rois = cfg.rois()
    ctx_ids = backbone.tokenize(prompt, "cpu")                                       # positions found on the host
    roi_ids = backbone.tokenize([r.format(token=t) for r in rois for t in tokens], "cpu")      # (P T, L)
    ctx_pos = token_positions(ctx_ids, applied.token_ids, prompt)                    # (1, T)
    roi_pos = torch.cat([token_positions(roi_ids[i:i + 1], [applied.token_ids[i % n_tok]], rois[i // n_tok])
                         for i in range(len(roi_ids))])                              # (P T, 1): row (p, j) holds v_j
    layers = cross_attention_layers(backbone.unet, cfg.attn_blocks, cfg.attn_factor)
    if cfg.use_att and not layers:
        raise InputError(f"no cross-attention layer in blocks {cfg.attn_blocks} at factor {cfg.attn_factor}")
    need_ctx = cfg.use_con or cfg.use_att
    text_ids = to_device(torch.cat(([ctx_ids] if need_ctx else []) + ([roi_ids] if cfg.use_roi else [])), device)
    # which token each batch row is mapped for: context row -> all tokens; RoI row j -> its own token
    pos_rows = to_device(torch.cat(([ctx_pos] if need_ctx else []) +
                                   ([roi_pos.expand(-1, n_tok)] if cfg.use_roi else [])), device)
    constant_text = None
    if not cfg.train_token:
        with torch.no_grad():
            constant_text = backbone.encode_text(text_ids)
    # the text goes to the UNet in the dtype its cross-attention K/V projections compute in: with trained fp32 copies
    # on every layer, fp32 (one cast a step, not one per projection and its backward)
    text_dtype = (torch.float32 if all(p.to_k is not None for p in applied.processors.values())
                  else backbone.unet.dtype)
    return Sources(backbone, pixels, latents, latents_flip, masks_lat, masks_lat.amax(1, keepdim=True), roi_latents,
                   roi_latents_flip, text_ids, pos_rows, constant_text, layers, text_dtype,
                   torch.channels_last if cfg.channels_last else torch.contiguous_format,
                   backbone.training_scheduler(), n, n_tok, need_ctx, posterior, roi_posterior,
                   valid_region(hw, cfg.context_border, device) if cfg.context_border else None)


@dataclass
class Noise:
    """A step's random draws (the numbers on the host, the tensors on the device)."""

    k: int                  # the source image
    flip: bool              # flipped horizontally, image and mask
    t: torch.Tensor         # (1,) the timestep
    eps: torch.Tensor       # (1, C, h, w) the noise, on the device
    roi_prompts: list[int] | None = None    # per token, which RoI prompt its row uses (several RoI prompts)
    z: torch.Tensor | None = None           # (1, C, h, w) posterior sample of x_0 (posterior "sample")
    z_roi: torch.Tensor | None = None       # (T, C, h, w) the same for l_RoI's masked images


def draw(src: Sources, cfg: LearnConfig, draws: Draws, step: int, device=None) -> Noise:
    """The random numbers of step ``step`` (named as :mod:`clic.draws` lists them); the tensors on ``device``
    (default: the model's)."""
    device, shape = device or src.latents.device, src.latents[:1].shape
    k = draws.integer(f"{step}/image", src.n_images)
    flip = cfg.flip_p > 0 and draws.uniform(f"{step}/flip") < cfg.flip_p
    t = torch.tensor([draws.integer(f"{step}/t", src.scheduler.config.num_train_timesteps)])
    eps = to_device(draws.normal(f"{step}/eps", shape), device)                    # sent without waiting
    noise = Noise(k, flip, t, eps)
    if cfg.use_roi and len(cfg.rois()) > 1:
        noise.roi_prompts = [draws.integer(f"{step}/roi_prompt/{j}", len(cfg.rois())) for j in range(src.n_tokens)]
    if src.posterior is not None:
        noise.z = to_device(draws.normal(f"{step}/z", shape), device)
    if src.roi_posterior is not None:
        noise.z_roi = to_device(draws.normal(f"{step}/z_roi", (src.n_tokens, *shape[1:])), device)
    return noise


@dataclass
class Batch:
    """The UNet inputs of a step: the context row x_t (if l_con or l_att) and a RoI row per token."""

    x_in: torch.Tensor      # (B, C, h, w) in the UNet's dtype
    t: torch.Tensor         # (1,) the timestep on the device
    target: torch.Tensor    # (1, C, h, w) what the UNet predicts: eps, or v for v-prediction models
    m_lat: torch.Tensor     # (1, T, h, w) M_s of the drawn image (flipped with it)
    u_lat: torch.Tensor     # (1, 1, h, w) the union of its masks


def noised_batch(backbone, src: Sources, cfg: LearnConfig, noise: Noise, x0: torch.Tensor) -> Batch:
    """The step's UNet inputs from the source latent ``x0`` ``(1, C, h, w)`` and the drawn noise."""
    scheduler, k = src.scheduler, noise.k
    m_lat = src.masks_lat[k:k + 1].flip(-1) if noise.flip else src.masks_lat[k:k + 1]       # (1, T, h, w)
    u_lat = src.union_lat[k:k + 1].flip(-1) if noise.flip else src.union_lat[k:k + 1]
    t = to_device(noise.t, backbone.device)
    x_t = scheduler.add_noise(x0, noise.eps, t)
    target = noise.eps if backbone.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise.eps, t)
    rows = [x_t] if src.need_context else []
    if cfg.use_roi:
        if cfg.roi_input == "latent":
            rows.append(m_lat[0, :, None] * x_t)                                      # eq. 4: M_s * x_t
        else:
            roi0 = src.roi_latent(noise)
            rows.append(scheduler.add_noise(roi0, noise.eps.expand_as(roi0), t))
    return Batch(torch.cat(rows).to(backbone.unet.dtype), t, target, m_lat, u_lat)


def step_losses(pred: torch.Tensor, maps: Callable[[], torch.Tensor] | None, batch: Batch, src: Sources,
                cfg: LearnConfig) -> list[torch.Tensor]:
    """``[l_tot, l_con, l_att, l_roi]`` (eq. 5, 3, 1, 4) of the UNet's fp32 prediction ``pred (B, C, h, w)`` and the
    captured maps ``maps() (B, T, h, w)`` of CA(v*, x_t) (used only with l_att); a switched-off term is 0."""
    zero = torch.zeros((), device=pred.device)
    l_con = zero
    if cfg.use_con:
        m_soft = soft_mask(batch.u_lat, cfg.alpha, cfg.soft_mask_form)
        if src.valid is not None:
            m_soft = m_soft * src.valid
        l_con = context_loss(pred[:1], batch.target, m_soft, cfg.context_form)
    l_att = zero
    if cfg.use_att:
        ca = maps()[0]                                                               # (T, h, w), context row
        l_att = torch.stack([attention_loss(ca[j:j + 1], batch.m_lat[0, j:j + 1], cfg.attn_norm)
                             for j in range(src.n_tokens)]).mean()
    l_roi = zero
    if cfg.use_roi:
        off = 1 if src.need_context else 0
        weight = (lambda j: batch.m_lat[:, j:j + 1]) if cfg.roi_weighting == "mask" else (lambda j: None)
        l_roi = torch.stack([roi_loss(pred[off + j:off + j + 1], batch.target, weight(j))
                             for j in range(src.n_tokens)]).mean()
    loss = total_loss(l_con, l_att, l_roi, cfg.lambda_att if cfg.use_att else 0.0,
                      cfg.lambda_roi if cfg.use_roi else 0.0, cfg.lambda_con if cfg.use_con else 0.0)
    return [loss, l_con, l_att, l_roi]


def forward_backward(backbone, src: Sources, cfg: LearnConfig, noise: Noise) -> torch.Tensor:
    """The step's forward and backward pass: its loss values ``(4,)`` (:data:`TERMS`, fp32, on the device), the
    gradients in the trained parameters' ``.grad``."""
    batch = noised_batch(backbone, src, cfg, noise, src.latent(noise))
    # the capture stays attached through backward (recomputed under gradient checkpointing)
    with capture_token_maps(backbone.unet, src.positions(noise), src.layers if cfg.use_att else [], src.hw) as capture:
        x_in = batch.x_in.contiguous(memory_format=src.memory_format)
        text = src.text(noise).to(src.text_dtype)
        pred = backbone.unet(x_in, batch.t.expand(x_in.shape[0]), **text.unet_kwargs()).sample
        losses = step_losses(pred.float(), capture.maps if cfg.use_att else None, batch, src, cfg)
        losses[0].backward()
    return torch.stack(losses).detach().float()


def optimizer_step(params: list[torch.Tensor], optimizer, cfg: LearnConfig) -> None:
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()


# ---------------------------------------------------------------------------------------------- the step as a graph


class StaticStep:
    """The learning step over fixed tensors (``--cuda-graphs capture``, :mod:`clic.capture`): the same computation
    as :func:`draw` + :func:`forward_backward` + the update, with every per-step value in one device tensor.

    :meth:`load` packs a step's draws into it (one copy from the host: the timestep, the index of the drawn image in
    the flip-major stacks, the prompt rows, the noise and posterior samples); :meth:`run` picks the image and rows
    from stacks of the constant sources by device indices, runs the step and leaves its loss values in
    :attr:`losses`. Nothing in :meth:`run` reads a device value or copies from the host."""

    def __init__(self, backbone, src: Sources, cfg: LearnConfig, params: list[torch.Tensor], optimizer):
        self.backbone, self.src, self.cfg, self.params, self.optimizer = backbone, src, cfg, params, optimizer
        flips = cfg.flip_p > 0

        def stack(x, x_flip=None, flip=lambda x: x.flip(-1)):
            """``x`` with its flipped version after it (index k + N flip)."""
            if x is None or not flips:
                return x
            return torch.cat([x, x_flip if x_flip is not None else flip(x)])

        self.latents = stack(src.latents, src.latents_flip)
        self.masks, self.union = stack(src.masks_lat), stack(src.union_lat)
        self.roi_latents = stack(src.roi_latents, src.roi_latents_flip)
        pairs = lambda post: None if post is None else tuple(
            stack(post[False][i], post[True][i] if flips else None) for i in range(2))
        self.posterior, self.roi_posterior = pairs(src.posterior), pairs(src.roi_posterior)
        n_rows = len(src.text_ids) if len(cfg.rois()) == 1 else int(src.need_context) + src.n_tokens
        shape = src.latents[:1].shape
        sizes = {"t": 1, "index": 1, "rows": n_rows, "eps": shape.numel(),
                 "z": shape.numel() if src.posterior is not None else 0,
                 "z_roi": src.n_tokens * shape.numel() if src.roi_posterior is not None else 0}
        self.slices, at = {}, 0
        for name, size in sizes.items():
            self.slices[name] = slice(at, at + size)
            at += size
        self.shape, self.inputs = shape, torch.zeros(at, device=backbone.device)
        self.losses: torch.Tensor | None = None

    def load(self, noise: Noise) -> None:
        """The step's draws (``noise``, drawn on the host) into the fixed input tensor (integers as fp32: exact below
        2^24)."""
        src = self.src
        rows = src._rows(torch.arange(len(src.text_ids)), noise)
        parts = [noise.t.float(), torch.tensor([noise.k + src.n_images * noise.flip], dtype=torch.float32),
                 rows.float(), noise.eps.flatten()]
        parts += [x.flatten() for x in (noise.z, noise.z_roi) if x is not None]
        self.inputs.copy_(to_device(torch.cat(parts), self.inputs.device))

    def view(self, name: str) -> torch.Tensor:
        return self.inputs[self.slices[name]]

    def narrowed(self) -> tuple[Sources, Noise]:
        """The sources narrowed to the drawn image (flipped or not) and the step's prompt rows, and the step's
        noise, all picked on the device."""
        src, index, rows = self.src, self.view("index").long(), self.view("rows").long()
        pick = lambda x: None if x is None else x.index_select(0, index)
        picked = lambda pair: None if pair is None else {False: tuple(pick(x) for x in pair)}
        step_src = replace(src, latents=pick(self.latents), latents_flip=None, masks_lat=pick(self.masks),
                           union_lat=pick(self.union), roi_latents=pick(self.roi_latents), roi_latents_flip=None,
                           text_ids=src.text_ids.index_select(0, rows), pos_rows=src.pos_rows.index_select(0, rows),
                           constant_text=None if src.constant_text is None else src.constant_text.index_select(0, rows),
                           posterior=picked(self.posterior), roi_posterior=picked(self.roi_posterior), n_images=1)
        z = self.view("z").view(self.shape) if src.posterior is not None else None
        z_roi = self.view("z_roi").view(src.n_tokens, *self.shape[1:]) if src.roi_posterior is not None else None
        return step_src, Noise(0, False, self.view("t").long(), self.view("eps").view(self.shape), None, z, z_roi)

    def run(self) -> None:
        """Forward, backward and update of the loaded step; its loss values in :attr:`losses`."""
        step_src, noise = self.narrowed()
        self.losses = forward_backward(self.backbone, step_src, self.cfg, noise)
        optimizer_step(self.params, self.optimizer, self.cfg)

    def drop_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def capture_loop(backbone, src: Sources, cfg: LearnConfig, applied: AppliedConcept, params, optimizer, draws: Draws,
                 run: Run) -> StepGraph:
    """:func:`learn`'s loop with the step as one CUDA graph (:mod:`clic.capture`): the same steps, draws, reads and
    checkpoints. The update of a step is in its graph, so it is done before the step's losses are read: a
    non-finite loss still stops the run at the next read, and a checkpoint still holds finite steps only (it is
    written after a read)."""
    static = StaticStep(backbone, src, cfg, params, optimizer)
    graph = StepGraph(backbone.device)
    try:
        for step in run.steps():
            token_warmup(optimizer, applied, cfg, step, run.start)
            if cfg.token_warmup_steps and step == cfg.token_warmup_steps + 1:
                graph.reset()                    # other trained set and learning rates: a new graph
            noise = draw(src, cfg, draws, step, device="cpu")
            static.load(noise)
            graph(static.run, static.drop_gradients)
            run.add(step, static.losses.clone(), t=int(noise.t))
            saves = run.checkpoint_due(step)
            ready = run.read() if saves or run.read_due(step) else []
            if saves:
                run.save_checkpoint(step)
            run.report(ready)
    finally:
        graph.close()
        optimizer.zero_grad(set_to_none=True)
    return graph
