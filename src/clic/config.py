"""One home for the options: the config dataclass of every job (shared by the ``clic`` commands, the Python API and
the web page) and the named recipes that preset them.

Defaults are the paper's. A *recipe* is a named preset of the values that differ, for learning, transfer and
generation alike (:data:`RECIPES`): ``paper`` (the default), ``official`` (the published CLiC scripts), and the
paper's baselines ``custom-diffusion``, ``break-a-scene`` and ``realfill``. Explicit options override the recipe::

    learn_config("official", steps=300)        # LearnConfig with the official code's values and 300 steps
    transfer_config("custom-diffusion")        # TransferConfig: blended editing without guidance (eta 0)
    learn_config("realfill")                   # RealFillConfig (RealFill has its own model and loop)

A new preset is one more entry of :data:`RECIPES`. Each field carries its help text (``--option`` help of the
command line) in its metadata; options that change how fast a job runs, not what it computes, are in the
``speed`` group (:func:`speed_options`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

from .attention import BLOCKS
from .checks import check_options
from .errors import InputError
from .fileio import read_document
from .models import DEFAULT_INPAINT_MODEL, DEFAULT_MODEL, SCHEDULERS
from .speed import COMPILE_MODES, CUDA_GRAPHS, GPU_SYNC_EVERY, SAMPLING_GRAPHS, compiles, sets_graph_options

SPEED = "speed"                 # metadata group of the speed options

PAPER_T_START = 15  # of 50 steps: the upper end of the paper's 5 <= t_start <= 15 (sec. 3.2)
PAPER_T_S = 5       # of 50 steps (sec. 4.1)

#: the official learning script's RoI prompts, one drawn per sample
OFFICIAL_ROI_PROMPTS = ("A photo of {token}", "A pattern of {token}", "{token}", "{token} on a blank background",
                        "A photo of {token} on a blank background", "{token} style", "A photo of {token} style",
                        "{token} style on a blank background")


def option(default, help: str, *, choices: tuple | None = None, group: str | None = None):
    """A dataclass field with the help text (and choices, group) of its ``--option``."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if group is not None:
        meta["group"] = group
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The ``--option`` of a field: ``lambda_att`` -> ``--lambda-att``."""
    return "--" + name.replace("_", "-")


def speed_options(cls) -> tuple[str, ...]:
    """The fields of ``cls`` that change how fast a job runs, not what it computes (beyond float rounding)."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("group") == SPEED)


# ---------------------------------------------------------------------------------------------- learning


LEARN_RECIPES = ("paper", "official", "custom-diffusion", "break-a-scene")     # the recipes of clic.learn.learn


@dataclass
class LearnConfig:
    """Hyper-parameters of in-context concept learning (sec. 3.1); defaults are the paper's (sec. 3.1 and 4)."""

    object_class: str = option("object", "OBJECT, the class of the object that carries the concept (e.g. chair)")
    prompt: str | None = option(None, "P_s, the context prompt; must contain the placeholder(s). "
                                      "Default: 'a OBJECT with <v*> style'")
    placeholder: str = option("<v*>", "the new token v*; with several masks the tokens are <v1*>, <v2*>, ...")
    initializer: str = option("pattern", "a single-token word whose embedding initialises v*, or piece:NAME, the "
                                         "vocabulary entry NAME as spelled there (official code: piece:ktn, a "
                                         "sub-word piece)")
    roi_prompt: str = option("a photo of {token}", "the RoI prompt c* of eq. 4 ({token} is replaced by v*)")
    roi_prompts: tuple[str, ...] = option((), "several RoI prompts c* (each with {token}); every step draws one per "
                                              "token (official code: 8 templates such as '{token} on a blank "
                                              "background'). Default: --roi-prompt only")
    steps: int = option(500, "optimisation steps (paper: 500)")
    lr: float = option(1e-5, "Adam learning rate of the cross-attention weights (paper: 1e-5)")
    token_lr: float | None = option(None, "learning rate of the token embedding (default: --lr, as Custom "
                                          "Diffusion)")
    optimizer: str = option("adam", "adam (paper) or adamw (official code, with --weight-decay 0.1)",
                            choices=("adam", "adamw"))
    weight_decay: float = option(0.0, "weight decay (official code: 0.1 with adamw)")
    grad_clip: float | None = option(None, "clip the gradient norm (official code: 1.0)")
    alpha: float = option(0.5, "alpha of the soft mask M_soft = alpha + (1 - alpha) M_s (eq. 2; official code: 0.25)")
    soft_mask_form: str = option("affine", "M_soft from M_s at latent size: affine, alpha + (1 - alpha) M_s (eq. 2), "
                                           "or floor, values below 0.05 become alpha and the rest are kept (official "
                                           "code; the same on a binary mask)", choices=("affine", "floor"))
    context_border: int = option(0, "l_con leaves out this many latent cells along the border (official code: 1, "
                                    "its augmentation's valid-region mask, which without the rescale augmentation "
                                    "is the latent less its outer ring)")
    mask_antialias: bool = option(True, "resize M_s to the latent size area-aware, each cell the mean of the pixels "
                                        "it covers (default); --no-mask-antialias: plain bilinear, each cell from "
                                        "the 4 pixels nearest its centre (official code)")
    lambda_con: float = option(1.0, "weight of l_con (paper: 1; official code: 0.5)")
    lambda_att: float = option(0.5, "lambda_att, weight of l_att (eq. 5; paper: 0.5; official code: 0.25)")
    lambda_roi: float = option(0.5, "lambda_RoI, weight of l_RoI (eq. 5; paper: 0.5; official code: 0.25)")
    use_con: bool = option(True, "use l_con (switch off for the paper's ablation, fig. 8)")
    use_att: bool = option(True, "use l_att (switch off for the paper's ablation, fig. 8)")
    use_roi: bool = option(True, "use l_RoI (switch off for the paper's ablation, fig. 8)")
    train: str = option("kv", "trained attention weights: kv (Custom Diffusion, paper), kv+q+out (official code), "
                              "or token (only the embedding)", choices=("kv", "kv+q+out", "token"))
    train_token: bool = option(True, "train the placeholder embedding")
    attn_blocks: tuple[str, ...] = option(("up",), "UNet blocks whose cross-attention maps form CA(v*, x_t) "
                                                   "(paper: up)")
    attn_factor: int | None = option(None, "use only cross-attention layers at this downsampling of the latent "
                                           "(e.g. 4: Break-A-Scene's 16x16 maps of a 64x64 latent; a model without "
                                           "cross-attention there uses its coarsest level); default: all")
    attn_norm: str = option("none", "rescale CA before l_att: none (paper), minmax (official code), max "
                                    "(Break-A-Scene)", choices=("none", "minmax", "max"))
    context_form: str = option("paper", "l_con form: paper (mean of (M_soft (e_hat - e))^2) or official (M_soft "
                                        "(e_hat - e)^2 summed over pixels and the latent channels, divided by "
                                        "M_soft summed over pixels)", choices=("paper", "official"))
    roi_input: str = option("latent", "RoI input: latent (paper: M_s * x_t) or pixels (official: the masked image "
                                      "with a mid-grey background, VAE-encoded, then noised)",
                            choices=("latent", "pixels"))
    roi_weighting: str = option("none", "RoI error weighting: none (paper) or mask (official code: the error "
                                        "weighted by M_s, summed over pixels and channels, divided by M_s summed "
                                        "over pixels)", choices=("none", "mask"))
    posterior: str = option("mean", "x_0 of the source image (and of l_RoI's masked image): the VAE posterior mean, "
                                    "encoded once (default), or a fresh posterior sample at every step (official "
                                    "code)", choices=("mean", "sample"))
    start_token_grad: bool = option(True, "the start token's key and value pass gradient to the trained K/V "
                                          "(default); --no-start-token-grad: they do not (official code)")
    token_warmup_steps: int = option(0, "first train only the token for this many steps (Break-A-Scene's phase 1)")
    token_warmup_lr: float = option(5e-4, "token learning rate during the token-only warm-up (Break-A-Scene: 5e-4)")
    flip_p: float = option(0.5, "probability of a horizontal flip of image and mask per step (official code: 0.5; "
                                "the paper does not say)")
    mask_threshold: float = option(0.5, "non-binary masks are thresholded at this value")
    binary_masks: bool = option(True, "threshold the source masks at --mask-threshold (default); --no-binary-masks: "
                                      "keep their soft values (official code)")
    image_fit: str = option("crop", "how a source image and its mask become the model resolution: crop (centre crop, "
                                    "bicubic image, area-resized mask) or stretch (the whole image, its aspect ratio "
                                    "not kept, PIL bilinear: official code)", choices=("crop", "stretch"))
    seed: int = option(0, "random seed (timesteps, noise, flips): same seed, same concept on CPU")
    checkpoint_every: int = option(100, "save a resumable checkpoint every N steps (0: never)")
    gradient_checkpointing: bool = option(False, "recompute the UNet's activations in the backward pass: less "
                                                 "memory (the option for small cards), slower; same losses",
                                          group=SPEED)
    channels_last: bool = option(False, "run the UNet in channels-last memory format (faster convolutions on GPUs); "
                                        "same losses up to float rounding", group=SPEED)
    compile_unet: bool = option(False, "torch.compile the UNet (the first steps pay the compile time); same losses "
                                       "up to float rounding", group=SPEED)
    compile_text: bool = option(False, "torch.compile the text encoder's transformer layers (run forward and "
                                       "backward every step while the token trains); same losses up to float "
                                       "rounding", group=SPEED)
    compile_mode: str = option("default", "torch.compile mode of --compile-unet / --compile-text: reduce-overhead "
                                          "replays the step as CUDA graphs (no per-kernel launch cost on the host); "
                                          "cudagraphs replays torch's own kernels as CUDA graphs (ready in seconds)",
                               choices=COMPILE_MODES, group=SPEED)
    cuda_graphs: str = option("auto", "replay the UNet and the text layers as CUDA graphs (torch's cudagraphs "
                                      "backend, channels-last UNet; the first run of a process pays a one-off "
                                      "capture, then the host no longer launches every kernel: see BENCHMARKS.md). "
                                      "auto: on for a CUDA device unless --gradient-checkpointing or a --compile / "
                                      "--channels-last option is given; capture: the whole learning step, update "
                                      "included, recorded as one CUDA graph after two eager steps (no tracing); "
                                      "same losses up to float rounding",
                              choices=CUDA_GRAPHS, group=SPEED)
    sync_every: int = option(0, "read the loss values back from the device every N steps (progress bar, log, NaN "
                                "check); in between the host runs ahead of the GPU without waiting. 0: 1 on the "
                                f"CPU, {GPU_SYNC_EVERY} on a GPU", group=SPEED)
    adam_impl: str = option("auto", "Adam kernel: auto (fused on CUDA, torch's default elsewhere), fused, foreach; "
                                    "same updates up to float rounding", choices=("auto", "fused", "foreach"),
                            group=SPEED)
    recipe: str = option("paper", "the recipe the other values were preset from (see clic.config.RECIPES)",
                         choices=LEARN_RECIPES)

    def check(self, n_tokens: int = 1) -> None:
        check_options(self)
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
        if self.cuda_graphs == "capture" and (compiles(self) or self.gradient_checkpointing):
            raise InputError("--cuda-graphs capture records the whole step itself: it does not go with --compile-* "
                             "or --gradient-checkpointing")
        if self.cuda_graphs == "on" and sets_graph_options(self):
            raise InputError("--cuda-graphs on sets the compile and memory-format options itself: give one or the "
                             "other")
        if self.token_warmup_steps and not self.train_token:
            raise InputError("--token-warmup-steps needs the token to train")
        if self.train == "token" and not self.train_token:
            raise InputError("nothing to train: --train token with the token frozen")
        for token in self.tokens(n_tokens):
            if token not in self.context_prompt(n_tokens):
                raise InputError(f"prompt {self.context_prompt(n_tokens)!r} does not contain the placeholder {token}")
        for roi_prompt in (self.roi_prompt, *self.roi_prompts):
            if "{token}" not in roi_prompt:
                raise InputError(f"RoI prompt {roi_prompt!r} must contain {{token}}")
        if self.context_border < 0:
            raise InputError(f"--context-border must be >= 0, got {self.context_border}")

    def tokens(self, n: int) -> list[str]:
        if n == 1:
            return [self.placeholder]
        stem = self.placeholder.rstrip(">").rstrip("*")
        return [f"{stem}{i + 1}*>" for i in range(n)]

    def rois(self) -> tuple[str, ...]:
        """The RoI prompts c* a step draws from (one: no draw)."""
        return tuple(self.roi_prompts) or (self.roi_prompt,)

    def context_prompt(self, n: int = 1) -> str:
        if self.prompt is not None:
            return self.prompt
        return f"a {self.object_class} with {' and '.join(self.tokens(n))} style"


@dataclass
class RealFillConfig:
    """Hyper-parameters of RealFill concept learning (the paper's adaptation, see :mod:`clic.baselines.realfill`)."""

    object_class: str = option("object", "OBJECT, the class of the object that carries the concept (metadata only: "
                                         "RealFill's prompt does not name it)")
    prompt: str | None = option(None, "training prompt with the placeholder (default: 'a photo of <v*>', RealFill's "
                                      "'a photo of sks')")
    placeholder: str = option("<v*>", "the new token v*")
    initializer: str = option("pattern", "a single-token word whose embedding initialises v*")
    steps: int = option(2000, "optimisation steps (RealFill: 2000)")
    batch_size: int = option(16, "samples per step (RealFill: 16)")
    micro_batch: int | None = option(None, "run each step in chunks of this many samples (gradient accumulation, "
                                           "same result up to float rounding; saves memory)", group=SPEED)
    lr: float = option(1e-5, "learning rate of the cross-attention K/V (Custom Diffusion's, for full matrices)")
    token_lr: float | None = option(None, "learning rate of the token embedding (default: --lr)")
    optimizer: str = option("adamw", "adamw (RealFill) or adam", choices=("adam", "adamw"))
    weight_decay: float = option(1e-2, "AdamW weight decay (RealFill: 1e-2)")
    grad_clip: float | None = option(1.0, "clip the gradient norm (RealFill: 1.0)")
    prompt_dropout: float = option(0.1, "probability of training a sample with the empty prompt (RealFill: 0.1)")
    full_mask_p: float = option(0.1, "probability of an all-ones inpainting mask (RealFill: 0.1)")
    max_rectangles: int = option(29, "random masks have 1..N rectangles (RealFill: 29)")
    invert_p: float = option(0.5, "probability of inverting a random mask (RealFill: 0.5)")
    loss_region: str = option("mask", "where the loss counts: mask (M_s, the concept: paper's adaptation) or image "
                                      "(everywhere, as RealFill's reference images)", choices=("mask", "image"))
    resize_crop: bool = option(True, "RealFill's augmentation: random resize to [R, 1.125 R], random crop to R")
    mask_threshold: float = option(0.5, "non-binary masks are thresholded at this value")
    seed: int = option(0, "random seed (masks, crops, timesteps, noise, prompt dropout)")
    checkpoint_every: int = option(100, "save a resumable checkpoint every N steps (0: never)")
    recipe: str = "realfill"

    def check(self, n_tokens: int = 1) -> None:
        check_options(self)
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
                raise InputError(f"{flag(name)} must be in [0, 1]")
        if self.max_rectangles < 1:
            raise InputError(f"--max-rectangles must be >= 1, got {self.max_rectangles}")
        if self.placeholder not in self.train_prompt():
            raise InputError(f"prompt {self.train_prompt()!r} does not contain the placeholder {self.placeholder}")

    def train_prompt(self) -> str:
        return self.prompt if self.prompt is not None else f"a photo of {self.placeholder}"


# ---------------------------------------------------------------------------------------------- sampling


@dataclass
class SamplingConfig:
    """Options every sampling job shares (transfer and generation)."""

    steps: int = option(50, "denoising steps of the schedule (paper and official code: 50)")
    guidance_scale: float = option(7.5, "classifier-free guidance scale (official code: 7.5; <= 1 switches CFG off)")
    scheduler: str = option("ddim", "sampler: ddim (paper and official code), ddpm, euler, euler-ancestral, "
                                    "dpm-solver", choices=tuple(SCHEDULERS))
    ddim_eta: float = option(0.0, "DDIM's eta: 0 = deterministic DDIM (diffusers' default), 1 = as stochastic as "
                                  "DDPM (official transfer script); ignored by the other schedulers")
    seeds: tuple[int, ...] = option((0,), "one image per seed")
    num: int | None = option(None, "number of images, seeds S, S+1, ... counted from the first --seeds value")
    negative_prompt: str = option("", "prompt of the unconditional CFG branch")
    batch_size: int = option(1, "images per UNet batch (results do not depend on it beyond float rounding)")
    compile_unet: bool = option(False, "torch.compile the UNet (pays off over many steps or images: the first ones "
                                       "pay the compile time); same images up to float rounding", group=SPEED)
    compile_mode: str = option("default", "torch.compile mode of --compile-unet: cudagraphs replays torch's kernels "
                                          "as CUDA graphs (ready in seconds), reduce-overhead compiles and replays "
                                          "them", choices=COMPILE_MODES, group=SPEED)

    def seed_list(self) -> list[int]:
        if self.num is None:
            return [int(s) for s in self.seeds]
        if len(self.seeds) > 1:
            raise InputError("give either several --seeds or --num, not both")
        return [int(self.seeds[0]) + k for k in range(self.num)]

    def check_sampling(self) -> None:
        check_options(self)
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

    def check_capture(self) -> None:
        """``--cuda-graphs capture`` (a field of the configs whose loops record their step): DDIM only, no
        compiling."""
        if self.cuda_graphs != "capture":
            return
        if self.compile_unet:
            raise InputError("--cuda-graphs capture records the whole step itself: it does not go with --compile-unet")
        if self.scheduler != "ddim":
            raise InputError(f"--cuda-graphs capture runs DDIM's update on the device: it needs --scheduler ddim, not "
                             f"{self.scheduler}")


def sampling_graphs_option(what: str, kinds: str):
    """The ``--cuda-graphs`` field of a sampling job whose loop can record its step (``what`` it computes; the
    ``kinds`` of step, each its own graph)."""
    return option("off", f"capture: the denoising step ({what}) over fixed tensors, recorded as a CUDA graph after "
                         f"two eager steps and replayed, one graph per kind of step ({kinds}); no tracing, DDIM only, "
                         "each batch of seeds records its own. The host then launches one graph a step instead of "
                         "each kernel. off: the plain loop. Same images up to float rounding",
                  choices=SAMPLING_GRAPHS, group=SPEED)


START_OPTIONS = ("t_start", "replace_steps", "strength")
#: --feather, in model pixels (the default is 8 at 512 px); a photo's own size scales it, up to ~14x
MAX_FEATHER = 1024


@dataclass
class TransferConfig(SamplingConfig):
    """Options of concept transfer (sec. 3.2); defaults follow the paper, the ``official`` recipe the published
    script. The start of the edit is given one of three ways (see :mod:`clic.transfer`)."""

    prompt: str | None = option(None, "prompt with the concept's token (default: the concept's training prompt, "
                                      "e.g. 'a chair with <v*> style')")
    t_start: int | None = option(None, "START, paper form: skip the first T_START of the --steps steps, i.e. noise "
                                       "the target to step T_START and denoise from there (paper: 5..15 of 50). "
                                       "This is the default: 15 of 50 (scaled with --steps), the strongest edit of "
                                       "the paper's range and the official script's 15 replaced steps")
    replace_steps: int | None = option(None, "START, official-code form: the first K steps have their latent "
                                             "replaced by the noised target (official: 15 or 20 of 50); same result "
                                             "as --t-start K-1 without the K-1 wasted UNet calls; K = 0: pure noise")
    strength: float | None = option(None, "START, diffusers img2img form: the fraction of the schedule that is "
                                          "denoised, t_start = steps - int(steps * strength)")
    blend: bool = option(True, "blended latent editing (eq. 6): outside M_tg keep the noised target at every step")
    blend_until: int | None = option(None, "blend only the latents entering steps i < N (official code: 46, i.e. up "
                                           "to step 45 of 50, the last steps unblended); default: every step and "
                                           "the final latent (paper)")
    blend_mask: str = option("any", "M_tg at latent resolution for eq. 6: any (a latent cell is edited if any of "
                                    "its pixels is in the mask), area (soft: the covered fraction), half (fraction "
                                    ">= 0.5), bicubic (soft: the mask file's grey levels resized straight to the "
                                    "latent size by PIL's bicubic filter, official code)",
                             choices=("any", "area", "half", "bicubic"))
    blend_noise: str = option("once", "noise of noised(x_tg, t) in eq. 6: once (one draw for every step, so outside "
                                      "M_tg the latent follows one forward-noising path) or fresh (a new draw at "
                                      "every step, official code)", choices=("once", "fresh"))
    posterior: str = option("mean", "x_tg, the target's latent: the VAE posterior mean (default) or a posterior "
                                    "sample per seed (official code)", choices=("mean", "sample"))
    eta: float = option(1.0, "eta, step size of the cross-attention guidance (eq. 7) on ||CA(v*, x_t) - M_tg||^2 "
                             "(see --guidance-reduction); 0 switches the guidance off. The paper gives no value; "
                             "with --guidance-optimizer adam it is Adam's learning rate (official: 0.01)")
    guidance_reduction: str = option("sum", "||CA(v*, x_t) - M||^2 of eq. 7 summed over the map's pixels (and "
                                            "tokens), or their mean (official code; with Adam only its epsilon sees "
                                            "the difference)", choices=("sum", "mean"))
    guidance_attention_grad: bool = option(True, "eq. 7's gradient flows through every attention layer's output "
                                                 "(the equation as written); --no-guidance-attention-grad: only "
                                                 "through the maps' queries and the UNet's other layers, as the "
                                                 "official code computes it (its processors reshape the attention "
                                                 "output without gradient)")
    guidance_range: tuple[int, ...] = option((0, 30), "FROM TO: the steps FROM <= i < TO of the schedule get the "
                                                      "guidance step (official code: the first 30 of 50); clipped "
                                                      "to the steps that run")
    guidance_target: str = option("mask", "map CA(v*) is pulled toward: mask (M_tg, paper eq. 7) or ones (an "
                                          "all-ones map, official code)", choices=("mask", "ones"))
    guidance_optimizer: str = option("sgd", "sgd: x - eta * grad (paper eq. 7); adam: one fresh Adam step of "
                                            "learning rate eta per guided step (official code)",
                                     choices=("sgd", "adam"))
    attn_blocks: tuple[str, ...] = option(("up",), "UNet blocks whose cross-attention maps form CA(v*, x_t) "
                                                   "(paper: up)")
    composite: bool = option(True, "paste the result into the target in pixel space: farther than --feather pixels "
                                   "outside M_tg the pixels are the target's exactly (not in the official code)")
    feather: int | None = option(None, "width in pixels of the composite's soft edge outside M_tg (default: "
                                       "resolution / 64, i.e. 8 px at 512 px; 0: hard edge)")
    mask_threshold: float = option(0.5, "a non-binary target mask is thresholded at this value")
    cuda_graphs: str = sampling_graphs_option("blend, guidance, CFG pass, DDIM update", "guided or not, blended or "
                                                                                            "not")
    recipe: str = option("paper", "the recipe the other values were preset from (see clic.config.RECIPES)",
                         choices=LEARN_RECIPES)

    # -- the start of the edit ------------------------------------------------------------------------------
    def start_step(self) -> int:
        """Index of the first denoising step that runs (the paper's t_start), from whichever start option is set."""
        given = [flag(n) for n in START_OPTIONS if getattr(self, n) is not None]
        if len(given) > 1:
            raise InputError(f"give one start option, not {' and '.join(given)}")
        n = self.steps
        if self.strength is not None:
            denoised = min(int(n * self.strength), n)
            if not 0 < self.strength <= 1 or denoised < 1:
                raise InputError(f"--strength {self.strength} is outside the {n}-step schedule: it must be in (0, 1] "
                                 f"and denoise at least one step (>= {1 / n:.3g})")
            return n - denoised
        if self.replace_steps is not None:
            if not 0 <= self.replace_steps <= n:
                raise InputError(f"--replace-steps {self.replace_steps} is outside the {n}-step schedule (0..{n})")
            return max(self.replace_steps - 1, 0)
        t_start = self.t_start if self.t_start is not None else round(PAPER_T_START * n / 50)
        if not 0 <= t_start < n:
            raise InputError(f"--t-start {t_start} is outside the {n}-step schedule (0..{n - 1})")
        return t_start

    @property
    def starts_from_noise(self) -> bool:
        return self.replace_steps == 0

    def guided(self, i: int) -> bool:
        return self.eta > 0 and self.guidance_range[0] <= i < self.guidance_range[1]

    def blended(self, i: int) -> bool:
        """Whether the latent entering step i (i = steps: the final latent) is blended by eq. 6."""
        return self.blend and (self.blend_until is None or i < self.blend_until)

    def check(self) -> None:
        self.check_sampling()
        if self.eta < 0:
            raise InputError(f"--eta must be >= 0 (0 switches the guidance off), got {self.eta}")
        if len(self.guidance_range) != 2 or not 0 <= self.guidance_range[0] <= self.guidance_range[1]:
            raise InputError(f"--guidance-range takes FROM TO with 0 <= FROM <= TO, got {self.guidance_range}")
        if self.blend_until is not None and self.blend_until < 0:
            raise InputError(f"--blend-until must be >= 0, got {self.blend_until}")
        if self.feather is not None and not 0 <= self.feather <= MAX_FEATHER:
            raise InputError(f"--feather must be in 0..{MAX_FEATHER} pixels, got {self.feather}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise InputError(f"--mask-threshold must be in (0, 1), got {self.mask_threshold}")
        unknown = set(self.attn_blocks) - set(BLOCKS)
        if unknown or not self.attn_blocks:
            raise InputError(f"--attn-blocks takes some of {', '.join(BLOCKS)}, got {self.attn_blocks}")
        self.check_capture()
        self.start_step()


@dataclass
class InpaintConfig(SamplingConfig):
    """Options of RealFill's transfer (inpainting the target mask); defaults from RealFill's ``infer.py``."""

    steps: int = option(200, "denoising steps (RealFill infer.py: 200)")
    guidance_scale: float = option(1.0, "classifier-free guidance scale (RealFill infer.py: 1, i.e. off)")
    scheduler: str = option("ddpm", "sampler (RealFill infer.py: ddpm)", choices=tuple(SCHEDULERS))
    prompt: str | None = option(None, "prompt with the concept's token (default: the training prompt, "
                                      "'a photo of <v*>')")
    composite: bool = option(True, "paste the result onto the target with the mask dilated 3x3 and box-blurred "
                                   "(RealFill infer.py)")
    attn_blocks: tuple[str, ...] = option(("up",), "UNet blocks whose cross-attention maps of v* are recorded")
    mask_threshold: float = option(0.5, "a non-binary target mask is thresholded at this value")

    def check(self) -> None:
        self.check_sampling()
        if not 0.0 < self.mask_threshold < 1.0:
            raise InputError(f"--mask-threshold must be in (0, 1), got {self.mask_threshold}")


@dataclass
class GenerateConfig(SamplingConfig):
    """Options of generation (sec. 4.1); defaults are the paper's."""

    object_class: str | None = option(None, "OBJECT to generate (default: the concept's object class)")
    prompt: str = option("a photo of {object}, with {token} style",
                         "prompt of the concept stage; {object} becomes OBJECT with its article ('a chair'), "
                         "{token} the concept's token(s)")
    base_prompt: str = option("a photo of {object}", "prompt of the base stage (paper: 'a photo of an OBJECT')")
    base_steps: int | None = option(None, "t_s: the first t_s steps run the base UNet with the base prompt; 0: "
                                          "plain generation with the concept (default: the paper's 5 of 50, scaled "
                                          "with --steps)")
    batch_size: int = option(4, "images per UNet batch (results do not depend on it beyond float rounding)")
    cuda_graphs: str = sampling_graphs_option("CFG pass, DDIM update", "the base stage and the concept stage")

    @property
    def t_s(self) -> int:
        return self.base_steps if self.base_steps is not None else round(PAPER_T_S * self.steps / 50)

    def check(self) -> None:
        self.check_sampling()
        self.check_capture()
        if not 0 <= self.t_s <= self.steps:
            raise InputError(f"--base-steps {self.t_s} is outside the {self.steps}-step schedule (0..{self.steps})")


# ---------------------------------------------------------------------------------------------- RoI matching


@dataclass
class MaskConfig:
    """From a token's cross-attention maps on an image to a binary mask (sec. 3.3)."""

    map_timesteps: tuple[int, ...] = option((200, 400, 600), "the image is noised to each of these timesteps (of "
                                                             "the 1000 training steps) and w*'s maps are averaged; "
                                                             "repeat a timestep for more noise draws")
    map_blocks: tuple[str, ...] = option(("up",), "UNet blocks whose cross-attention maps are averaged (paper: up)")
    map_seed: int = option(0, "seed of the noise added to the image")
    threshold: str = option("otsu", "'otsu' (Otsu's threshold of the normalised map) or a fixed level in [0, 1] of "
                                    "the min-max normalised map; pixels >= the level are in the mask")
    smooth: float = option(0.0, "Gaussian smoothing of the resized map before thresholding, sigma in pixels of the "
                                "model resolution (0: none)")
    dilate: int = option(0, "grow the mask by this many pixels of the model resolution (0: none)")

    def level(self) -> float | None:
        """The fixed threshold, or None for Otsu's."""
        text = str(self.threshold).strip().lower()
        if text == "otsu":
            return None
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"--threshold must be 'otsu' or a number in [0, 1], got {self.threshold!r}") from None
        if not 0.0 <= value <= 1.0:
            raise InputError(f"--threshold must be 'otsu' or a number in [0, 1], got {self.threshold}")
        return value

    def check(self, num_train_timesteps: int | None = None) -> None:
        check_options(self)
        self.level()
        if not self.map_timesteps:
            raise InputError("--map-timesteps needs at least one timestep")
        top = num_train_timesteps or 1000
        if any(not 0 <= int(t) < top for t in self.map_timesteps):
            raise InputError(f"--map-timesteps must be in [0, {top - 1}], got {list(self.map_timesteps)}")
        if not self.map_blocks or set(self.map_blocks) - set(BLOCKS):
            raise InputError(f"--map-blocks must be some of {', '.join(BLOCKS)}, got {list(self.map_blocks)}")
        if self.smooth < 0 or not math.isfinite(self.smooth):
            raise InputError(f"--smooth must be >= 0, got {self.smooth}")
        if self.dilate < 0:
            raise InputError(f"--dilate must be >= 0, got {self.dilate}")


@dataclass
class MatchConfig:
    """Learning w* for automatic target masks (sec. 3.3); the paper gives the prompt, the loss and 500 steps."""

    object_class: str | None = option(None, "OBJECT of the prompt (default: the concept's object class)")
    prompt: str | None = option(None, "prompt of l_att, must contain the placeholder (default: 'a <w*> region of a "
                                      "OBJECT')")
    placeholder: str = option("<w*>", "the new token w* (another name is picked if the concept uses it)")
    token: str | None = option(None, "the concept token whose learned embedding initialises w* (default: the "
                                     "first)")
    steps: int = option(500, "optimisation steps (paper: 500)")
    lr: float = option(1e-5, "Adam learning rate of w*'s embedding (the paper's only learning rate; it gives none "
                             "for this step)")
    flip_p: float = option(0.5, "probability of a horizontal flip of image and mask per step (as in learning)")
    attn_norm: str = option("none", "rescale CA before l_att: none (paper), minmax, max",
                            choices=("none", "minmax", "max"))
    attn_blocks: tuple[str, ...] = option(("up",), "UNet blocks whose maps form CA(w*, x_t) in l_att (paper: up)")
    seed: int = option(0, "random seed of the optimisation (timesteps, noise, flips)")

    def check(self) -> None:
        check_options(self)
        if self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.flip_p <= 1:
            raise InputError(f"--flip-p must be in [0, 1], got {self.flip_p}")
        if self.prompt is not None and self.placeholder not in self.prompt:
            raise InputError(f"prompt {self.prompt!r} does not contain the placeholder {self.placeholder}")


@dataclass
class DiscoverConfig:
    """Learning w* and K/V from several images with the plain diffusion loss, to find their common pattern."""

    object_class: str = option("object", "OBJECT, the class of the objects that carry the pattern (e.g. vase)")
    prompt: str | None = option(None, "prompt of the diffusion loss, must contain the placeholder (default: 'an "
                                      "OBJECT with <w*> style')")
    placeholder: str = option("<w*>", "the new token w*")
    initializer: str = option("pattern", "a single-token word whose embedding initialises w*")
    steps: int = option(500, "optimisation steps (paper: 500)")
    lr: float = option(1e-5, "Adam learning rate of w* and the cross-attention K/V (paper: 1e-5)")
    flip_p: float = option(0.5, "probability of a horizontal flip per step (as in learning)")
    seed: int = option(0, "random seed of the optimisation")
    learn_concept: bool = option(True, "then learn the concept in context (sec. 3.1) with the discovered masks")

    def check(self) -> None:
        check_options(self)
        MatchConfig(steps=self.steps, lr=self.lr, flip_p=self.flip_p, prompt=self.prompt,
                    placeholder=self.placeholder).check()


# ---------------------------------------------------------------------------------------------- recipes


def _break_a_scene_phases(values: dict, given: dict) -> dict:
    """Fewer (or more) steps than the recipe's 800: the token-only phase stays half of them, as 400 of 800."""
    if "steps" in given and "token_warmup_steps" not in given:
        return {**values, "token_warmup_steps": values["steps"] // 2}
    return values


@dataclass(frozen=True)
class Recipe:
    """A named preset: the values, different from the paper's defaults, of one method's learning, transfer and
    generation configs (``adjust(values, explicit options)`` derives learning values from the options given)."""

    name: str
    title: str
    summary: str
    learn: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)
    generate: dict = field(default_factory=dict)
    learn_class: type = LearnConfig
    transfer_class: type = TransferConfig
    default_model: str = DEFAULT_MODEL
    adjust: Callable[[dict, dict], dict] | None = None


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("paper", "CLiC (paper)",
           "v* + cross-attention K/V with l_con + 0.5 l_att + 0.5 l_RoI; transfer by blended editing with "
           "cross-attention guidance; two-stage generation"),
    # The published scripts (learning.py with reproduce.sh's options, --noaug; transfer.py), computed as they compute
    # them: README.md, "Paper vs. official code", lists each difference with the option that selects it.
    Recipe("official", "CLiC (official code)",
           "the published scripts: alpha 0.25 (floor form), weights 0.5/0.25/0.25, AdamW, K/V/Q/out, masked-pixel RoI "
           "under 8 prompts, posterior samples; transfer with an Adam step toward an all-ones map, blending up to "
           "step 45 with a soft bicubic mask and fresh noise, DDIM eta 1, no composite",
           learn=dict(alpha=0.25, soft_mask_form="floor", lambda_con=0.5, lambda_att=0.25, lambda_roi=0.25,
                      optimizer="adamw", weight_decay=0.1, grad_clip=1.0, train="kv+q+out", attn_norm="minmax",
                      context_form="official", context_border=1, mask_antialias=False, roi_input="pixels",
                      roi_weighting="mask", roi_prompts=OFFICIAL_ROI_PROMPTS, initializer="piece:ktn",
                      posterior="sample", start_token_grad=False, binary_masks=False, image_fit="stretch",
                      flip_p=0.5),
           transfer=dict(replace_steps=15, blend_until=46, ddim_eta=1.0, guidance_target="ones",
                         guidance_optimizer="adam", eta=0.01, composite=False, blend_mask="bicubic",
                         blend_noise="fresh", posterior="sample", guidance_reduction="mean",
                         guidance_attention_grad=False)),
    # The paper's Custom Diffusion baseline: unmasked diffusion loss (alpha = 1), "an OBJECT with <v*> style" (the
    # same template as P_s). Published recipe: AdamW (weight decay 1e-2), grad clip 1, h-flip; its 250 steps at batch
    # 2 are 500 samples: here 500 steps at batch 1 (lr 1e-5 = its --scale_lr value at batch 1). See baselines/README.
    Recipe("custom-diffusion", "Custom Diffusion",
           "v* + cross-attention K/V, unmasked diffusion loss, 'a OBJECT with <v*> style'; transfer by blended "
           "editing, no guidance",
           learn=dict(alpha=1.0, use_att=False, use_roi=False, context_form="paper", train="kv", optimizer="adamw",
                      weight_decay=1e-2, grad_clip=1.0, flip_p=0.5),
           transfer=dict(eta=0.0), generate=dict(base_steps=0)),
    # Break-A-Scene as the paper ran it: token + cross-attention K/V; masked loss (alpha = 0: M (e_hat - e), plain
    # mean, not area-normalised); attention loss on the 16x16 (latent / 4) down and up maps divided by their max,
    # weight 0.01; phase 1 = 400 steps token only at 5e-4, phase 2 = 400 steps at 2e-6. No prior preservation.
    # As google/break-a-scene: AdamW (weight decay 1e-2), grad clip 1, h-flip of image and mask with p = 0.5.
    Recipe("break-a-scene", "Break-A-Scene",
           "token-only phase, then v* + cross-attention K/V with the masked loss and its attention loss, 'a photo "
           "of <v*>'; transfer by blended latent diffusion",
           learn=dict(alpha=0.0, context_form="paper", use_roi=False, attn_blocks=("down", "up"), attn_factor=4,
                      attn_norm="max", lambda_att=0.01, token_warmup_steps=400, token_warmup_lr=5e-4, lr=2e-6,
                      steps=800, train="kv", prompt="a photo of <v*>", flip_p=0.5, optimizer="adamw",
                      weight_decay=1e-2, grad_clip=1.0),
           transfer=dict(eta=0.0), generate=dict(base_steps=0), adjust=_break_a_scene_phases),
    # RealFill as the paper adapts it: its own model (SD1.x inpainting) and loop (clic.baselines.realfill); the
    # configs' defaults are its recipe.
    Recipe("realfill", "RealFill",
           "v* + cross-attention K/V of an inpainting model under random masks, loss on M_s, 'a photo of <v*>'; "
           "transfer by inpainting the target mask + paste",
           generate=dict(base_steps=0), learn_class=RealFillConfig, transfer_class=InpaintConfig,
           default_model=DEFAULT_INPAINT_MODEL),
)}


def recipe_named(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def _values(cls, name: str, phase: str, preset: dict, overrides: dict) -> tuple[dict, dict]:
    """(the values of a ``cls`` config: recipe ``name``'s preset, then the explicit options; the explicit ones)."""
    given = {k: v for k, v in overrides.items() if v is not None and k != "recipe"}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise InputError(f"option(s) {', '.join(flag(u) for u in unknown)} do not apply to {recipe_named(name).title} "
                         f"{phase}")
    if phase == "transfer" and any(k in given for k in START_OPTIONS):   # an explicit start replaces the recipe's
        preset = {k: v for k, v in preset.items() if k not in START_OPTIONS}
    values = {**preset, **given}
    if "recipe" in names:
        values["recipe"] = name
    return values, given


def learn_config(recipe: str = "paper", **overrides) -> LearnConfig | RealFillConfig:
    """The learning config of ``recipe`` with explicit overrides (None values are ignored)."""
    r = recipe_named(recipe)
    values, given = _values(r.learn_class, recipe, "learning", r.learn, overrides)
    if r.adjust is not None:
        values = r.adjust({**{f.name: f.default for f in fields(r.learn_class)}, **values}, given)
    return r.learn_class(**values)


def transfer_config(recipe: str = "paper", **overrides) -> TransferConfig | InpaintConfig:
    """The transfer config of ``recipe`` with explicit overrides (None values are ignored); an explicit start
    option (``t_start``, ``replace_steps``, ``strength``) replaces the recipe's."""
    r = recipe_named(recipe)
    return r.transfer_class(**_values(r.transfer_class, recipe, "transfer", r.transfer, overrides)[0])


def generate_config(recipe: str = "paper", **overrides) -> GenerateConfig:
    """The generation config of ``recipe`` with explicit overrides (None values are ignored)."""
    return GenerateConfig(**_values(GenerateConfig, recipe, "generation", recipe_named(recipe).generate, overrides)[0])


def read_options(path) -> dict:
    """Option values from a YAML or JSON file holding one mapping (e.g. ``{recipe: official, steps: 300}``)."""
    data = read_document(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: the config file must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def learn_config_file(path, **overrides) -> LearnConfig:
    """A learning config from a file of option values (its ``recipe`` key selects the preset), with overrides."""
    values = read_options(path)
    name = values.pop("recipe", None) or "paper"
    if name not in LEARN_RECIPES:
        raise InputError(f"{path}: recipe {name!r} is not one of clic learn's ({', '.join(LEARN_RECIPES)})")
    return learn_config(name, **{**values, **{k: v for k, v in overrides.items() if v is not None}})
