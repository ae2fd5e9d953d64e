"""In-context concept learning (paper sec. 3.1, eq. 1-5).

One straight training loop, :func:`learn`. Per step, with one timestep t and one noise eps shared by all
branches (as the official code does):

    x_t      = sqrt(a_t) x_0 + sqrt(1 - a_t) eps                        (x_0: VAE latent of the source, cached)
    context  : eps_theta(x_t, c, t),  c = "a chair with <v*> style"      -> l_con (eq. 3, soft mask eq. 2)
               and CA_theta(v*, x_t) from the up-block cross-attention   -> l_att (eq. 1)
    RoI      : eps_theta(M_s * x_t, c*, t), c* = "a photo of <v*>"       -> l_RoI (eq. 4)
    l_tot    = l_con + lambda_att l_att + lambda_RoI l_RoI               (eq. 5)

The context and RoI branches run as one UNet batch. Trained: the placeholder embedding(s) and fp32 copies of
the cross-attention K/V (Custom Diffusion), optionally Q/out (official code). Nothing else requires grad.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

from .attention import capture_token_maps, clic_processors, cross_attention_layers, install_processors
from .concept import Concept
from .errors import InputError, TrainingError
from .fileio import atomic_path
from .imaging import resize_mask
from .losses import attention_loss, context_loss, roi_loss, soft_mask, total_loss
from .speed import (COMPILE_MODES, CUDA_GRAPHS, GPU_SYNC_EVERY, compiles, mark_step, sets_graph_options, speed_levers,
                    to_device, with_cuda_graphs)
from .tokens import add_placeholders, concept_embedding, initializer_embedding, token_positions

log = logging.getLogger(__name__)


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LearnConfig:
    """Hyper-parameters of in-context concept learning; defaults are the paper's (sec. 3.1 and 4)."""

    object_class: str = _opt("object", "OBJECT, the class of the object that carries the concept (e.g. chair)")
    prompt: str | None = _opt(None, "P_s, the context prompt; must contain the placeholder(s). "
                                    "Default: 'a OBJECT with <v*> style'")
    placeholder: str = _opt("<v*>", "the new token v*; with several masks the tokens are <v1*>, <v2*>, ...")
    initializer: str = _opt("pattern", "a single-token word whose embedding initialises v*")
    roi_prompt: str = _opt("a photo of {token}", "the RoI prompt c* of eq. 4 ({token} is replaced by v*)")
    steps: int = _opt(500, "optimisation steps (paper: 500)")
    lr: float = _opt(1e-5, "Adam learning rate of the cross-attention weights (paper: 1e-5)")
    token_lr: float | None = _opt(None, "learning rate of the token embedding (default: --lr, as Custom Diffusion)")
    optimizer: str = _opt("adam", "adam (paper) or adamw (official code, with --weight-decay 0.1)",
                          choices=("adam", "adamw"))
    weight_decay: float = _opt(0.0, "weight decay (official code: 0.1 with adamw)")
    grad_clip: float | None = _opt(None, "clip the gradient norm (official code: 1.0)")
    alpha: float = _opt(0.5, "alpha of the soft mask M_soft = alpha + (1 - alpha) M_s (eq. 2; official code: 0.25)")
    lambda_con: float = _opt(1.0, "weight of l_con (paper: 1; official code: 0.5)")
    lambda_att: float = _opt(0.5, "lambda_att, weight of l_att (eq. 5; paper: 0.5; official code: 0.25)")
    lambda_roi: float = _opt(0.5, "lambda_RoI, weight of l_RoI (eq. 5; paper: 0.5; official code: 0.25)")
    use_con: bool = _opt(True, "use l_con (switch off for the paper's ablation, fig. 8)")
    use_att: bool = _opt(True, "use l_att (switch off for the paper's ablation, fig. 8)")
    use_roi: bool = _opt(True, "use l_RoI (switch off for the paper's ablation, fig. 8)")
    train: str = _opt("kv", "trained attention weights: kv (Custom Diffusion, paper), kv+q+out (official code), "
                            "or token (only the embedding)", choices=("kv", "kv+q+out", "token"))
    train_token: bool = _opt(True, "train the placeholder embedding")
    attn_blocks: tuple[str, ...] = _opt(("up",), "UNet blocks whose cross-attention maps form CA(v*, x_t) (paper: up)")
    attn_factor: int | None = _opt(None, "use only cross-attention layers at this downsampling of the latent "
                                         "(e.g. 4: Break-A-Scene's 16x16 maps of a 64x64 latent); default: all")
    attn_norm: str = _opt("none", "rescale CA before l_att: none (paper), minmax (official code), max (Break-A-Scene)",
                          choices=("none", "minmax", "max"))
    context_form: str = _opt("paper", "l_con form: paper (||M_soft (e_hat - e)||^2) or official "
                                      "(sum M_soft (e_hat - e)^2 / sum M_soft)", choices=("paper", "official"))
    roi_input: str = _opt("latent", "RoI input: latent (paper: M_s * x_t) or pixels (official: the masked image "
                                    "with a mid-grey background, VAE-encoded, then noised)", choices=("latent", "pixels"))
    roi_weighting: str = _opt("none", "RoI error weighting: none (paper) or mask (official code)",
                              choices=("none", "mask"))
    token_warmup_steps: int = _opt(0, "first train only the token for this many steps (Break-A-Scene's phase 1)")
    token_warmup_lr: float = _opt(5e-4, "token learning rate during the token-only warm-up (Break-A-Scene: 5e-4)")
    flip_p: float = _opt(0.5, "probability of a horizontal flip of image and mask per step (official code: 0.5; "
                              "the paper does not say)")
    mask_threshold: float = _opt(0.5, "non-binary masks are thresholded at this value")
    seed: int = _opt(0, "random seed (timesteps, noise, flips): same seed, same concept on CPU")
    checkpoint_every: int = _opt(100, "save a resumable checkpoint every N steps (0: never)")
    reference_path: bool = _opt(False, "benchmark only: compute like the official code (explicit softmax in every "
                                       "attention layer, VAE/text re-encoded every step, context and RoI as separate "
                                       "UNet passes, gradients for the whole UNet); same losses, slower")
    gradient_checkpointing: bool = _opt(False, "recompute the UNet's activations in the backward pass: less memory "
                                               "(the option for small cards), slower; same losses")
    channels_last: bool = _opt(False, "run the UNet in channels-last memory format (faster convolutions on GPUs); "
                                      "same losses up to float rounding")
    compile_unet: bool = _opt(False, "torch.compile the UNet (the first steps pay the compile time); same losses up "
                                     "to float rounding")
    compile_text: bool = _opt(False, "torch.compile the text encoder's transformer layers (run forward and backward "
                                     "every step while the token trains); same losses up to float rounding")
    compile_mode: str = _opt("default", "torch.compile mode of --compile-unet / --compile-text: reduce-overhead "
                                        "replays the step as CUDA graphs (no per-kernel launch cost on the host); "
                                        "cudagraphs replays torch's own kernels as CUDA graphs (ready in seconds)",
                             choices=COMPILE_MODES)
    cuda_graphs: str = _opt("auto", "replay the UNet and the text layers as CUDA graphs (torch's cudagraphs backend, "
                                    "channels-last UNet; the first run of a process pays 15-40 s of capture, then the "
                                    "host no longer launches every kernel: 2.3-3.7x faster steps on an H100). auto: "
                                    "on for a CUDA device unless --reference-path, --gradient-checkpointing or a "
                                    "--compile / --channels-last option is given; same losses up to float rounding",
                            choices=CUDA_GRAPHS)
    sync_every: int = _opt(0, "read the loss values back from the device every N steps (progress bar, log, NaN check); "
                              "in between the host runs ahead of the GPU without waiting. 0: 1 on the CPU, "
                              f"{GPU_SYNC_EVERY} on a GPU (the reference path: 1, as the official code)")
    adam_impl: str = _opt("auto", "Adam kernel: auto (fused on CUDA, torch's default elsewhere), fused, foreach; "
                                  "same updates up to float rounding", choices=("auto", "fused", "foreach"))
    recipe: str = _opt("paper", "preset: paper, official (the published CLiC script), or the paper's baselines "
                                "custom-diffusion and break-a-scene; explicit options override it",
                       choices=("paper", "official", "custom-diffusion", "break-a-scene"))

    def check(self, n_tokens: int = 1) -> None:
        if self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}")
        if self.lr <= 0 or (self.token_lr is not None and self.token_lr < 0):
            raise InputError("learning rates must be positive")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"--alpha must be in [0, 1], got {self.alpha}")
        if min(self.lambda_con, self.lambda_att, self.lambda_roi) < 0:
            raise InputError("loss weights must be >= 0")
        if not (self.use_con or self.use_att or self.use_roi):
            raise InputError("all losses are switched off")
        if not 0 <= self.flip_p <= 1:
            raise InputError(f"--flip-p must be in [0, 1], got {self.flip_p}")
        if self.sync_every < 0:
            raise InputError(f"--sync-every must be >= 0, got {self.sync_every}")
        if self.compile_mode != "default" and not compiles(self):
            raise InputError(f"--compile-mode {self.compile_mode} needs --compile-unet or --compile-text")
        if self.cuda_graphs == "on" and (sets_graph_options(self) or self.reference_path):
            raise InputError("--cuda-graphs on sets the compile and memory-format options itself (and is not for "
                             "--reference-path): give one or the other")
        if self.token_warmup_steps and not self.train_token:
            raise InputError("--token-warmup-steps needs the token to train")
        if self.train == "token" and not self.train_token:
            raise InputError("nothing to train: --train token with the token frozen")
        for token in self.tokens(n_tokens):
            if token not in self.context_prompt(n_tokens):
                raise InputError(f"prompt {self.context_prompt(n_tokens)!r} does not contain the placeholder {token}")
        if "{token}" not in self.roi_prompt:
            raise InputError(f"RoI prompt {self.roi_prompt!r} must contain {{token}}")

    def tokens(self, n: int) -> list[str]:
        if n == 1:
            return [self.placeholder]
        stem = self.placeholder.rstrip(">").rstrip("*")
        return [f"{stem}{i + 1}*>" for i in range(n)]

    def context_prompt(self, n: int = 1) -> str:
        if self.prompt is not None:
            return self.prompt
        return f"a {self.object_class} with {' and '.join(self.tokens(n))} style"


RECIPES: dict[str, dict] = {
    "paper": {},
    "official": dict(alpha=0.25, lambda_con=0.5, lambda_att=0.25, lambda_roi=0.25, optimizer="adamw",
                     weight_decay=0.1, grad_clip=1.0, train="kv+q+out", attn_norm="minmax", context_form="official",
                     roi_input="pixels", roi_weighting="mask", flip_p=0.5),
    # The paper's Custom Diffusion baseline: unmasked diffusion loss (alpha = 1), "an OBJECT with <v*> style" (the
    # same template as P_s). Published recipe: AdamW (weight decay 1e-2), grad clip 1, h-flip; its 250 steps at batch
    # 2 are 500 samples: here 500 steps at batch 1 (lr 1e-5 = its --scale_lr value at batch 1). See baselines/README.
    "custom-diffusion": dict(alpha=1.0, use_att=False, use_roi=False, context_form="paper", train="kv",
                             optimizer="adamw", weight_decay=1e-2, grad_clip=1.0, flip_p=0.5),
    # Break-A-Scene as the paper ran it: token + cross-attention K/V; masked loss (alpha = 0: M (e_hat - e), plain
    # mean, not area-normalised); attention loss on the 16x16 (latent / 4) down and up maps divided by their max,
    # weight 0.01; phase 1 = 400 steps token only at 5e-4, phase 2 = 400 steps at 2e-6. No prior preservation.
    # As google/break-a-scene: AdamW (weight decay 1e-2), grad clip 1, h-flip of image and mask with p = 0.5.
    "break-a-scene": dict(alpha=0.0, context_form="paper", use_roi=False, attn_blocks=("down", "up"), attn_factor=4,
                          attn_norm="max", lambda_att=0.01, token_warmup_steps=400, token_warmup_lr=5e-4, lr=2e-6,
                          steps=800, train="kv", prompt="a photo of <v*>", flip_p=0.5, optimizer="adamw",
                          weight_decay=1e-2, grad_clip=1.0),
}


def make_config(recipe: str = "paper", **overrides) -> LearnConfig:
    """A :class:`LearnConfig` from a recipe, with explicit overrides (None values are ignored)."""
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    names = {f.name for f in fields(LearnConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise InputError(f"unknown option(s) {sorted(unknown)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None and k != "recipe"},
              "recipe": recipe}
    return replace(LearnConfig(), **values)


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".ckpt")


def _save_checkpoint(path: Path, step: int, params: list[torch.Tensor], optimizer, generator, cfg_json: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng"] = generator.get_state()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"step": str(step), "config": cfg_json})


def _load_checkpoint(path: Path, params: list[torch.Tensor], optimizer, generator, cfg_json: str) -> int:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise TrainingError(f"{path}: unreadable checkpoint ({exc})") from exc
    if meta.get("config") != cfg_json:
        raise TrainingError(f"{path}: checkpoint was made with other options; remove it or use the same options")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device))
    state = optimizer.state_dict()
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value.to(params[int(i)].device) if name != "step" else value
    state["state"] = opt_state
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng"])
    return int(meta["step"])


def open_run(out_path, log_path, resume: bool, params, optimizer, generator, cfg_json: str):
    """Start or resume a training run: ``(checkpoint path, last finished step, earlier log records, open log file)``.

    With ``resume`` and an existing ``<out>.ckpt``, parameters, optimiser and RNG state are restored and the log is
    rewritten up to the checkpoint's step, so the continued run ends as the uninterrupted one would.
    """
    ckpt = _checkpoint_path(Path(out_path)) if out_path else None
    start, history = 0, []
    if resume and ckpt is not None and ckpt.is_file():
        start = _load_checkpoint(ckpt, params, optimizer, generator, cfg_json)
        log.info("resumed from %s at step %d", ckpt, start)
        if log_path and Path(log_path).is_file():
            history = [r for r in map(json.loads, Path(log_path).read_text().splitlines()) if r["step"] <= start]
    log_file = None
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")
        for record in history:
            log_file.write(json.dumps(record) + "\n")
    return ckpt, start, history, log_file


def log_step(record: dict, history: list, log_file, bar, shown: tuple[str, ...]) -> None:
    """After an optimiser step: keep ``record`` in the history and the JSON-lines log, advance the progress bar."""
    history.append(record)
    if log_file:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    bar.update(1)
    bar.set_postfix({k: f"{record[k]:.4f}" for k in shown})


# ---------------------------------------------------------------------------------------------- learning

#: options that change how fast a run goes, not what it computes (beyond float rounding): a checkpoint resumes
#: under other values of them
SPEED_OPTIONS = ("checkpoint_every", "gradient_checkpointing", "channels_last", "compile_unet", "compile_text",
                 "compile_mode", "cuda_graphs", "adam_impl", "sync_every")


def sync_interval(cfg: LearnConfig, device) -> int:
    """``cfg.sync_every`` resolved for ``device``: steps between the loop's reads of the loss values."""
    if cfg.reference_path:
        return 1                                   # the official code reads the loss at every step
    return cfg.sync_every or (1 if torch.device(device).type == "cpu" else GPU_SYNC_EVERY)


def reads_losses(step: int, start: int, last: int, every: int) -> bool:
    """Whether the loop reads the loss values back after ``step`` (and reports the steps since the last read): the
    first step of a run (its loss at once, and its time apart), every ``every`` steps, and the last."""
    return step == start + 1 or step == last or (step - start) % every == 0


@dataclass
class LearnResult:
    concept: Concept
    history: list[dict]
    processors: dict


def learn(backbone, images: list[torch.Tensor], masks: list[torch.Tensor], cfg: LearnConfig, out_path=None,
          log_path=None, resume: bool = False, progress: bool = True,
          callback: Callable[[int, dict], None] | None = None,
          init_vectors: torch.Tensor | None = None) -> LearnResult:
    """Learn v* from source images and their RoI masks.

    Args:
        backbone: a :class:`clic.models.Backbone` (modified in place: placeholder tokens and processors added).
        images: ``(3, R, R)`` tensors in [-1, 1] at the model resolution R.
        masks: ``(n_tokens, R, R)`` binary masks, one channel per concept token (usually 1).
        out_path: where the concept file goes; also names the checkpoint (``<out>.ckpt``).
        log_path: JSON-lines log of the loss terms per step.
        resume: continue from ``<out>.ckpt`` if it exists (same result as an uninterrupted run).
        callback: called as ``callback(step, record)`` for every step, when its loss values are read back from the
            device: at once on the CPU, in bursts of ``sync_every`` steps on a GPU (:func:`reads_losses`).
        init_vectors: ``(n_tokens, dim)`` initial embeddings (e.g. w* starts from the learned v*, sec. 3.3);
            default: the embedding of ``cfg.initializer``.
    """
    if len(images) != len(masks) or not images:
        raise InputError("give one mask per source image")
    n_tok = masks[0].shape[0]
    if any(m.shape[0] != n_tok for m in masks):
        raise InputError("every source image needs the same number of masks")
    cfg.check(n_tok)
    device = backbone.device
    cfg = with_cuda_graphs(cfg, device)
    tokens = cfg.tokens(n_tok)
    prompt = cfg.context_prompt(n_tok)

    # 1. New tokens (initialised from the initializer word) and trainable cross-attention copies.
    if init_vectors is None:
        init_vectors = initializer_embedding(backbone, cfg.initializer).expand(n_tok, -1).clone()
    token_ids = add_placeholders(backbone, tokens, init_vectors.reshape(n_tok, -1))
    embedding = concept_embedding(backbone.text_encoder)
    if cfg.train == "token":
        # keep whatever cross-attention weights are installed (e.g. a learned concept's, for w* in sec. 3.3)
        processors = clic_processors(backbone.unet) or install_processors(backbone.unet, train_kv=False)
        attn_params = []
    else:
        processors = install_processors(backbone.unet, train_kv=True, train_q_out=cfg.train == "kv+q+out",
                                        explicit_softmax=cfg.reference_path)
        attn_params = [p for proc in processors.values() for p in proc.parameters()]
    for p in attn_params:
        p.requires_grad_(True)
    embedding.new.requires_grad_(cfg.train_token)
    params = ([embedding.new] if cfg.train_token else []) + attn_params
    groups = []
    if cfg.train_token:
        groups.append({"params": [embedding.new], "lr": cfg.token_lr if cfg.token_lr is not None else cfg.lr})
    if attn_params:
        groups.append({"params": attn_params, "lr": cfg.lr})
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    impl = "fused" if cfg.adam_impl == "auto" and device.type == "cuda" else cfg.adam_impl
    optimizer = opt_cls(groups, weight_decay=cfg.weight_decay, **({impl: True} if impl != "auto" else {}))
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]

    self_attention = {n: p for n, p in backbone.unet.attn_processors.items() if ".attn2." not in n}
    if cfg.reference_path:
        from diffusers.models.attention_processor import AttnProcessor

        explicit = {n: (p if ".attn2." in n else AttnProcessor()) for n, p in backbone.unet.attn_processors.items()}
        backbone.unet.set_attn_processor(explicit)      # self-attention's own processors come back at the end
        base_params = [p for n, p in backbone.unet.named_parameters() if ".processor." not in n]
        for p in base_params:
            p.requires_grad_(True)   # gradients computed for the whole UNet (then discarded), as the official code

    # 2. Everything constant is computed once: latents (and their flips), resized masks, token ids.
    scheduler = backbone.training_scheduler()
    with torch.no_grad():
        pixels = torch.stack(images).to(device)
        latents = backbone.encode_image(pixels)                                      # (N, C, h, w)
        latents_flip = backbone.encode_image(pixels.flip(-1)) if cfg.flip_p > 0 else None
        hw = tuple(latents.shape[-2:])
        masks_t = torch.stack(masks).float().to(device)                              # (N, T, R, R)
        masks_lat = resize_mask(masks_t, hw)                                         # (N, T, h, w)
        union_lat = masks_lat.amax(1, keepdim=True)                                  # (N, 1, h, w)
        roi_latents = roi_latents_flip = None
        if cfg.use_roi and cfg.roi_input == "pixels":
            # official code: pixels outside the mask set to 0 in [-1, 1] (mid-grey), then VAE-encoded
            roi_px = pixels[:, None] * masks_t[:, :, None]                           # (N, T, 3, R, R)
            roi_latents = backbone.encode_image(roi_px.flatten(0, 1)).unflatten(0, (len(images), n_tok))
            if cfg.flip_p > 0:
                roi_latents_flip = backbone.encode_image(roi_px.flatten(0, 1).flip(-1)).unflatten(0, (len(images), n_tok))
    ctx_ids = backbone.tokenize(prompt, "cpu")                                         # positions found on the host
    roi_ids = backbone.tokenize([cfg.roi_prompt.format(token=t) for t in tokens], "cpu")
    ctx_pos = token_positions(ctx_ids, token_ids, prompt)                            # (1, T)
    roi_pos = torch.cat([token_positions(roi_ids[j:j + 1], [token_ids[j]], cfg.roi_prompt)
                         for j in range(n_tok)])                                     # (T, 1): row j holds v_j
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

    # 3. Resume.
    cfg_json = json.dumps({k: v for k, v in asdict(cfg).items() if k not in SPEED_OPTIONS}, sort_keys=True, default=str)
    generator = torch.Generator().manual_seed(cfg.seed)
    ckpt, start, history, log_file = open_run(out_path, log_path, resume, params, optimizer, generator, cfg_json)

    # 4. The loop.
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="learning v*", unit="step")
    unet_dtype = backbone.unet.dtype
    # the text goes to the UNet in the dtype its cross-attention K/V projections compute in: with trained fp32 copies
    # on every layer, fp32 (one cast a step, not one per projection and its backward)
    text_dtype = torch.float32 if all(p.to_k is not None for p in processors.values()) else unet_dtype
    num_t = scheduler.config.num_train_timesteps
    last_good = None
    sync_every = sync_interval(cfg, device)
    pending: list[tuple[int, int, torch.Tensor]] = []     # (step, t, loss terms on the device) not yet read

    def read_losses(last_good) -> list[dict]:
        """The pending steps' records, their loss values read in one copy; a TrainingError at a non-finite loss."""
        rows = torch.stack([v for _, _, v in pending]).cpu().tolist()
        records = []
        for (step, t, _), row in zip(pending, rows):
            records.append({"step": step, "t": t, **dict(zip(("loss", "l_con", "l_att", "l_roi"), row))})
            if not math.isfinite(records[-1]["loss"]):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingError(f"loss became {records[-1]['loss']} at step {step}; {where} (try a lower --lr)")
        pending.clear()
        return records

    levers = ExitStack()
    levers.enter_context(speed_levers(backbone, cfg))
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    step_scope = ExitStack()
    try:
        for step in range(start + 1, cfg.steps + 1):
            mark_step(cfg)
            warm = step <= cfg.token_warmup_steps
            if cfg.token_warmup_steps and step in (start + 1, cfg.token_warmup_steps + 1):
                # Break-A-Scene phase 1: only the token, at its own lr; then everything at the normal lrs
                for group in optimizer.param_groups:
                    is_token = group["params"][0] is embedding.new
                    group["lr"] = (cfg.token_warmup_lr if warm else group["initial_lr"]) if is_token else group["initial_lr"]
                for p in attn_params:
                    p.requires_grad_(not warm)
            # host draws (same numbers on every device), sent without waiting for the device
            k = int(torch.randint(len(images), (1,), generator=generator))
            flip = cfg.flip_p > 0 and float(torch.rand(1, generator=generator)) < cfg.flip_p
            t_host = torch.randint(0, num_t, (1,), generator=generator)
            eps = to_device(torch.randn(latents[k:k + 1].shape, generator=generator), device)
            x0 = (latents_flip if flip else latents)[k:k + 1]
            if cfg.reference_path:  # no caching: encode the (flipped) source every step
                with torch.no_grad():
                    x0 = backbone.encode_image(pixels[k:k + 1].flip(-1) if flip else pixels[k:k + 1])
            m_lat = masks_lat[k:k + 1].flip(-1) if flip else masks_lat[k:k + 1]       # (1, T, h, w)
            u_lat = union_lat[k:k + 1].flip(-1) if flip else union_lat[k:k + 1]
            t = to_device(t_host, device)
            x_t = scheduler.add_noise(x0, eps, t)
            target = eps if backbone.prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)

            batch = [x_t] if need_ctx else []
            if cfg.use_roi:
                if cfg.roi_input == "latent":
                    batch.append(m_lat[0, :, None] * x_t)                             # eq. 4: M_s * x_t
                else:
                    roi0 = (roi_latents_flip if flip else roi_latents)[k]
                    batch.append(scheduler.add_noise(roi0, eps.expand_as(roi0), t))
            x_in = torch.cat(batch).to(unet_dtype)
            text = constant_text if constant_text is not None else backbone.encode_text(text_ids)

            if cfg.reference_path:
                text = backbone.encode_text(text_ids)  # no caching of text embeddings either
            step_scope = ExitStack()   # the capture stays attached through backward (recomputed under checkpointing)
            if not cfg.reference_path:
                capture = step_scope.enter_context(
                    capture_token_maps(backbone.unet, pos_rows, layers if cfg.use_att else [], hw))
                x_in = x_in.contiguous(memory_format=memory_format)
                pred = backbone.unet(x_in, t.expand(x_in.shape[0]), text.to(text_dtype)).sample.float()
            else:  # one UNet pass per branch, the maps from the first (context) pass
                preds = []
                for i in range(x_in.shape[0]):
                    with capture_token_maps(backbone.unet, pos_rows[i:i + 1], layers if (cfg.use_att and i == 0) else [],
                                            hw) as cap_i:
                        preds.append(backbone.unet(x_in[i:i + 1], t, text[i:i + 1].to(text_dtype)).sample.float())
                    capture = cap_i if i == 0 else capture
                pred = torch.cat(preds)

            zero = torch.zeros((), device=device)
            l_con = context_loss(pred[:1], target, soft_mask(u_lat, cfg.alpha), cfg.context_form) if cfg.use_con else zero
            l_att = zero
            if cfg.use_att:
                ca = capture.maps()[0]                                                # (T, h, w), context branch
                l_att = torch.stack([attention_loss(ca[j:j + 1], m_lat[0, j:j + 1], cfg.attn_norm)
                                     for j in range(n_tok)]).mean()
            l_roi = zero
            if cfg.use_roi:
                off = 1 if need_ctx else 0
                weight = (lambda j: m_lat[:, j:j + 1]) if cfg.roi_weighting == "mask" else (lambda j: None)
                l_roi = torch.stack([roi_loss(pred[off + j:off + j + 1], target, weight(j))
                                     for j in range(n_tok)]).mean()
            loss = total_loss(l_con, l_att, l_roi, cfg.lambda_att if cfg.use_att else 0.0,
                              cfg.lambda_roi if cfg.use_roi else 0.0, cfg.lambda_con if cfg.use_con else 0.0)
            with step_scope:
                loss.backward()
            pending.append((step, int(t_host), torch.stack([loss, l_con, l_att, l_roi]).detach().float()))
            saves = ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps
            # the only wait for the device: the pending steps' loss values in one copy, checked finite before this
            # step's update (with sync_every 1 no NaN ever reaches the weights; a checkpoint holds finite steps only)
            ready = read_losses(last_good) if saves or reads_losses(step, start, cfg.steps, sync_every) else []
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.reference_path:
                for p in base_params:
                    p.grad = None
            if saves:
                _save_checkpoint(ckpt, step, params, optimizer, generator, cfg_json)
                last_good = ckpt
            for record in ready:
                log_step(record, history, log_file, bar, ("l_con", "l_att", "l_roi"))
                if callback:
                    callback(record["step"], record)
    finally:
        step_scope.close()   # a step that failed between forward and backward leaves no capture attached
        if cfg.reference_path:
            backbone.unet.set_attn_processor({**backbone.unet.attn_processors, **self_attention})
        levers.close()
        bar.close()
        if log_file:
            log_file.close()

    for p in params:
        p.requires_grad_(False)
    if cfg.reference_path:
        for p in base_params:
            p.requires_grad_(False)
            p.grad = None
    concept = Concept.from_training(
        backbone, tokens, embedding.new[-n_tok:], processors, method=cfg.recipe, prompt=prompt,
        roi_prompt=cfg.roi_prompt, object_class=cfg.object_class, initializer=cfg.initializer,
        config=asdict(cfg), final_losses=history[-1] if history else {},
    )
    if out_path:
        concept.save(out_path)
        if ckpt is not None and ckpt.is_file():
            ckpt.unlink()
    return LearnResult(concept, history, processors)
