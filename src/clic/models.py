"""Load a Stable Diffusion backbone (hub id or local diffusers folder) and pick device and dtype.

Sizes (resolution, latent size, channels, heads) always come from the loaded configs: SD1.x and SD2.x
layouts, 512 or 768 px, epsilon or v-prediction all go through the same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import hf_hub_download
from transformers import CLIPTextModel, CLIPTokenizer

from .errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
#: The SD1.x inpainting checkpoint (SD1.5-inpainting, formerly runwayml/stable-diffusion-inpainting): the
#: inpainting counterpart of the paper's SD1.4, the base of the RealFill baseline.
DEFAULT_INPAINT_MODEL = "stable-diffusion-v1-5/stable-diffusion-inpainting"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: sampler names -> diffusers classes (first-order or multistep: one UNet call per step)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
}


def available_devices() -> list[str]:
    """The devices this torch can run on here, best first (``cuda:N`` for each GPU)."""
    out = [f"cuda:{k}" if torch.cuda.device_count() > 1 else "cuda" for k in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def check_device(name: str) -> torch.device:
    """The device ``name`` names, if this machine has it; else a :class:`ModelError` naming the alternatives."""
    here = f"available here: {', '.join(available_devices())}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelError(f"unknown device {name!r}; {here}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ModelError(f"device {name!r}: {why}; {here}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"device {name!r}: there are {torch.cuda.device_count()} GPU(s); {here}")
    elif device.type == "mps":
        if "mps" not in available_devices():
            raise ModelError(f"device {name!r}: Apple's MPS is not available; {here}")
    elif device.type != "cpu":
        raise ModelError(f"device {name!r} is not supported; {here}")
    return device


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given (and available: :func:`check_device`), else cuda > mps > cpu."""
    if name and name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _config_dict(config) -> dict:
    items = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
    return {k: v for k, v in items.items() if not k.startswith("_") and k not in ("name_or_path", "transformers_version", "dtype", "torch_dtype")}


@dataclass
class Backbone:
    """The frozen parts of a Stable Diffusion pipeline, plus what the rest of clic needs to know about them."""

    model_id: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def resolution(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def is_inpainting(self) -> bool:
        return int(self.unet.config.in_channels) == 2 * self.latent_channels + 1

    # -- identity of the base model -------------------------------------------------------------------------
    def config_hash(self) -> str:
        """Hash of the architecture (UNet, text encoder, VAE configs, vocabulary size). Equal for SD1.4 and 1.5.

        The text encoder counts with its base vocabulary: a stock pipeline that loaded textual-inversion tokens (which
        resizes the embedding table) is still the same base model."""
        text = {**_config_dict(self.text_encoder.config), "vocab_size": self.base_vocab_size}
        blob = json.dumps(
            {"unet": _config_dict(self.unet.config), "text": text,
             "vae": _config_dict(self.vae.config), "vocab": self.base_vocab_size},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def weight_stats(self) -> list[float]:
        """A few dtype-robust statistics of base weights that tell checkpoints of one architecture apart."""
        name = next(n for n in self.unet.attn_processors if ".attn2." in n)
        attn = dict(self.unet.named_modules())[name[: -len(".processor")]]
        stats = []
        for w in (attn.to_k.weight, attn.to_v.weight, self.text_encoder.get_input_embeddings().weight[:1000]):
            w = w.detach().float()
            stats += [w.mean().item(), w.std().item()]
        return stats

    @property
    def base_vocab_size(self) -> int:
        return int(self.extra.get("base_vocab_size", self.text_encoder.config.vocab_size))

    # -- encoders -------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str] | str, device=None) -> torch.Tensor:
        """Token ids ``(B, L)`` padded to the model length, on ``device`` (default: the model's)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device or self.device)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], ``(B, 3, H, W)`` -> scaled latents (posterior mean, deterministic)."""
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return latents.float() * self.vae.config.scaling_factor

    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1], ``(B, 3, H, W)`` -> the VAE posterior's (mean, std), unscaled, fp32."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def posterior_sample(self, mean: torch.Tensor, std: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """A scaled latent drawn from the posterior (:meth:`encode_posterior`) with the standard Gaussian ``z``: as
        diffusers' ``latent_dist.sample()``, (mean + std z) * scaling_factor."""
        return (mean + std * z.to(mean.device)) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        pixels = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return pixels.float().clamp(-1, 1)

    def sampling_scheduler(self, kind: str = "ddim", **overrides):
        """A diffusers scheduler for sampling (one of :data:`SCHEDULERS`, or ``pndm``), built from the model's
        scheduler config.

        ``clip_sample`` is False unless the config says otherwise: SD checkpoints ship a PNDM config without
        that key, DDIM's default is True (it would clip x_0 to [-1, 1]), and diffusers' pipelines force it to
        False at load time; doing the same keeps our samples equal to stock pipelines' (and to the official code's).
        v-prediction models (SD2) need nothing else: the config carries ``prediction_type``.
        """
        classes = {**SCHEDULERS, "pndm": "PNDMScheduler"}
        if kind not in classes:
            raise ModelError(f"unknown scheduler {kind!r}; choose one of {', '.join(classes)}")
        config = {"clip_sample": False, **self.scheduler_config, **overrides}
        return getattr(diffusers, classes[kind]).from_config(config)

    def training_scheduler(self):
        return DDPMScheduler.from_config(self.scheduler_config)

    # -- building -------------------------------------------------------------------------------------------
    @classmethod
    def from_modules(cls, model_id: str, tokenizer, text_encoder, vae, unet, scheduler_config: dict,
                     device: torch.device, dtype: torch.dtype, base_vocab_size: int | None = None) -> "Backbone":
        """The backbone of loaded (or built) modules: everything frozen, in eval mode, on ``device`` in ``dtype``.
        ``base_vocab_size``: the base model's vocabulary (default: the tokenizer's size)."""
        for module in (text_encoder, vae, unet):
            if module.dtype != dtype:
                module.to(dtype=dtype)
            module.requires_grad_(False).eval().to(device)
        config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        return cls(model_id, tokenizer, text_encoder, vae, unet, config, device, dtype,
                   extra={"base_vocab_size": base_vocab_size or len(tokenizer)})

    @classmethod
    def of_pipeline(cls, pipe, model_id: str | None = None) -> "Backbone":
        """The backbone that *is* a loaded diffusers pipeline's components (``StableDiffusionPipeline``, its Img2Img
        and Inpaint siblings, :class:`clic.pipeline.ClicPipeline`): the same module objects, not copies, left on
        their device and in their dtype. Its base vocabulary is the tokenizer's own, without tokens loaded since."""
        missing = [n for n in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if getattr(pipe, n, None) is None]
        if missing:
            raise ModelError(f"{type(pipe).__name__} has no {', '.join(missing)}: not a Stable Diffusion pipeline")
        name = model_id or getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
        config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
        return cls(str(name), pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, config, pipe.unet.device,
                   pipe.unet.dtype, extra={"base_vocab_size": int(pipe.tokenizer.vocab_size)})


def _is_local(model: str) -> bool:
    return os.path.isdir(model) or model.startswith((".", "/", "~"))


def load_backbone(model=DEFAULT_MODEL, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, timings: dict | None = None, *,
                  torch_dtype: torch.dtype | None = None, revision: str | None = None, variant: str | None = None,
                  token: str | bool | None = None, **hub_kwargs) -> Backbone:
    """Load tokenizer, text encoder, VAE and UNet of a diffusers checkpoint; everything frozen, eval mode.

    Args:
        model: a hub id (looked up in the local cache first; offline, a miss is a one-line error), a local folder
            in the diffusers layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
            ``scheduler/``), or a loaded pipeline (``StableDiffusionPipeline`` and the like): its components are
            used as they are, moved to ``device`` and cast to ``dtype`` only if those are given.
        device: default cuda > mps > cpu (:func:`pick_device`); a pipeline's own device for a pipeline.
        dtype / torch_dtype: precision of the frozen parts (``"fp16"``, ``torch.float16``, ...; default fp32, or a
            pipeline's own); ``torch_dtype``, diffusers' name, wins when both are given.
        timings: filled with the seconds of each part (``tokenizer``, ``text_encoder``, ``vae``, ``unet``: reading
            and building each on the CPU in ``dtype``; ``to_device``: moving them to ``device`` and freezing them;
            for a loaded pipeline only ``to_device``).
        revision, variant, token: as in diffusers' ``from_pretrained`` (a branch or commit; ``"fp16"`` reads the
            half-precision files, half the download; a hub token for gated or private repositories). Other keyword
            arguments (``cache_dir``, ``local_files_only``, ...) go to every component's ``from_pretrained``.
    """
    timings = {} if timings is None else timings
    clock = time.perf_counter
    if not isinstance(model, (str, os.PathLike)):
        backbone = Backbone.of_pipeline(model)
        dtype = parse_dtype(torch_dtype or dtype or backbone.dtype)
        device = pick_device(device) if device is not None else backbone.device
        t0 = clock()
        backbone = Backbone.from_modules(backbone.model_id, backbone.tokenizer, backbone.text_encoder, backbone.vae,
                                         backbone.unet, backbone.scheduler_config, torch.device(device), dtype,
                                         base_vocab_size=backbone.base_vocab_size)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)
        timings["to_device"] = clock() - t0
        return backbone
    device = pick_device(device) if not isinstance(device, torch.device) else device
    dtype = parse_dtype(torch_dtype or dtype or "fp32")
    model = str(model)
    local = _is_local(model)
    if local:
        root = Path(model).expanduser()
        if not (root / "model_index.json").is_file() and not (root / "unet").is_dir():
            raise ModelError(f"{model}: not a diffusers model folder (no model_index.json / unet/)")
        source, kw = str(root), {}
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        source, kw = model, {"local_files_only": offline}
    kw.update({k: v for k, v in dict(hub_kwargs, revision=revision, token=token).items() if v is not None})
    weights = {"variant": variant} if variant else {}
    try:
        t0 = clock()
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        t1 = clock()
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **kw,
                                                     **weights)
        t2 = clock()
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw, **weights)
        t3 = clock()
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kw, **weights)
        timings.update(tokenizer=t1 - t0, text_encoder=t2 - t1, vae=t3 - t2, unet=clock() - t3)
        with open(_resolve_file(source, "scheduler/scheduler_config.json", kw)) as f:
            scheduler_config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    except ModelError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        if local:
            raise ModelError(f"{model}: cannot load the diffusers model folder ({str(exc).splitlines()[0]})") from exc
        if not kw.get("local_files_only"):
            raise ModelError(f"cannot load {model!r} from the Hugging Face hub ({str(exc).splitlines()[0]}); check "
                             "the id, and for a gated model accept its licence on the hub and log in (`hf auth "
                             "login`, or token=...)") from exc
        raise ModelError(
            f"model {model!r} is not available offline (not in the Hugging Face cache and the hub cannot be "
            "reached); pass a local diffusers folder with --model /path/to/model "
            "(e.g. one made by `clic make-model tiny DIR`)"
        ) from exc
    log.info("loaded %s on %s (%s)", model, device, dtype)
    t0 = clock()
    backbone = Backbone.from_modules(model, tokenizer, text_encoder, vae, unet, scheduler_config, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["to_device"] = clock() - t0
    return backbone


def bundled_model() -> Path | None:
    """The toy model shipped in the package (``clic/assets/toymodel``), or None in a checkout without it."""
    path = Path(str(resources.files("clic") / "assets" / "toymodel"))
    return path if (path / "model_index.json").is_file() else None


def _resolve_file(source: str, relpath: str, kw: dict) -> str:
    if os.path.isdir(source):
        return os.path.join(source, relpath)
    folder, name = relpath.rsplit("/", 1)
    hub = {k: v for k, v in kw.items() if k in ("local_files_only", "revision", "token", "cache_dir")}
    return hf_hub_download(source, name, subfolder=folder, **hub)
