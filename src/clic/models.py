"""Load a Stable Diffusion backbone (hub id or local diffusers folder) and pick device and dtype.

Sizes (resolution, latent size, channels, heads) always come from the loaded configs: SD1.x and SD2.x
layouts, 512 or 768 px, epsilon or v-prediction all go through the same code, and so does SDXL.

What differs between the families is the text side, and one class knows it for each: :class:`Backbone` (SD1.x and
SD2.x: one CLIP text encoder, its last hidden states) and :class:`SDXLBackbone` (two text encoders, CLIP ViT-L and
OpenCLIP bigG, whose penultimate hidden states are concatenated, plus the second one's pooled embedding and the
size/crop time ids). Both turn token ids into a :class:`TextConditioning`, all the UNet is given besides x_t and t;
the rest of clic passes it on without looking inside.
"""

from __future__ import annotations

import dataclasses
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
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelError
from .speed import to_device

log = logging.getLogger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
#: The SDXL checkpoint ``--model sdxl`` stands for.
DEFAULT_SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
#: short names of ``--model``
MODEL_ALIASES = {"sdxl": DEFAULT_SDXL_MODEL}
#: The SD1.x inpainting checkpoint (SD1.5-inpainting, formerly runwayml/stable-diffusion-inpainting): the
#: inpainting counterpart of the paper's SD1.4, the base of the RealFill baseline.
DEFAULT_INPAINT_MODEL = "stable-diffusion-v1-5/stable-diffusion-inpainting"
#: SDXL's inpainting checkpoint (a 9-channel SDXL UNet; the base of RealFill on SDXL)
DEFAULT_SDXL_INPAINT_MODEL = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
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
    """The GPU's name, or the CPU's with the number of threads torch uses (or the meta device's)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "meta":
        return "meta device (shapes, no values: counts only)"
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


@dataclass(frozen=True, eq=False)
class TextConditioning:
    """What the UNet is conditioned on besides x_t and t, for B prompt rows (made by :meth:`Backbone.encode_text`).

    Attributes:
        hidden: ``(B, L, D)`` the ``encoder_hidden_states`` the cross-attention layers attend to (SDXL: both text
            encoders' penultimate hidden states side by side, D = 768 + 1280).
        pooled: ``(B, P)`` SDXL's pooled text embedding (the second encoder's projected end-of-text state); None for
            SD1.x/SD2.x.
        time_ids: ``(1, 6)`` SDXL's size and crop conditioning (original size, crop top-left, target size), the same
            for every row; None for SD1.x/SD2.x.

    Rows are taken and joined like a tensor's (``cond[-B:]``, :meth:`cat`, :meth:`repeat_interleave`);
    :meth:`unet_kwargs` are the UNet's keyword arguments.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> "TextConditioning":
        return TextConditioning(fn(self.hidden), None if self.pooled is None else fn(self.pooled), self.time_ids)

    def __getitem__(self, rows: slice) -> "TextConditioning":
        return self._map(lambda x: x[rows])

    def index_select(self, dim: int, index: torch.Tensor) -> "TextConditioning":
        """The rows ``index`` (a device tensor: picked without reading it on the host); ``dim`` must be 0."""
        if dim != 0:
            raise ValueError("a TextConditioning is indexed by its rows (dim 0)")
        return self._map(lambda x: x.index_select(0, index))

    def to(self, dtype: torch.dtype) -> "TextConditioning":
        out = self._map(lambda x: x.to(dtype))
        return out if self.time_ids is None else dataclasses.replace(out, time_ids=self.time_ids.to(dtype))

    def expand(self, batch: int) -> "TextConditioning":
        """One row as ``batch`` rows (no copy)."""
        return self._map(lambda x: x.expand(batch, *x.shape[1:]))

    def repeat_interleave(self, repeats: int) -> "TextConditioning":
        return self._map(lambda x: x.repeat_interleave(repeats, 0))

    def zeros_like(self) -> "TextConditioning":
        return self._map(torch.zeros_like)

    def detach(self) -> "TextConditioning":
        return self._map(lambda x: x.detach())

    @staticmethod
    def cat(parts: list["TextConditioning"]) -> "TextConditioning":
        """The rows of ``parts`` one after the other (their time ids are the backbone's, the same for all)."""
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.hidden for p in parts]), pooled, parts[0].time_ids)

    def unet_kwargs(self) -> dict:
        """``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs`` (diffusers' ``text_embeds`` and
        ``time_ids``, one row of each per prompt row) of a ``UNet2DConditionModel`` call."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.hidden}
        time_ids = self.time_ids.expand(len(self), -1)
        return {"encoder_hidden_states": self.hidden,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": time_ids}}


@dataclass
class Backbone:
    """The frozen parts of a Stable Diffusion (SD1.x, SD2.x) pipeline, plus what the rest of clic needs to know about
    them. :class:`SDXLBackbone` is the same for SDXL."""

    family = "sd"

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

    # -- the text side (what SDXLBackbone changes) ----------------------------------------------------------
    @property
    def tokenizers(self) -> list:
        """The tokenizers, one per text encoder (placeholder tokens are added to each)."""
        return [self.tokenizer]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders, in the order of :attr:`tokenizers` (each gets the placeholders' embedding rows)."""
        return [self.text_encoder]

    @property
    def modules(self) -> list[torch.nn.Module]:
        """Every frozen model: UNet, VAE, text encoders."""
        return [self.unet, self.vae, *self.text_encoders]

    @property
    def embedding_dims(self) -> list[int]:
        """The token-embedding size of each text encoder: a token's embedding is their rows side by side."""
        return [int(te.config.hidden_size) for te in self.text_encoders]

    def tokenize(self, prompts: list[str] | str, device=None) -> torch.Tensor:
        """Token ids ``(B, L)`` padded to the model length, on ``device`` (default: the model's). With several text
        encoders (SDXL), each tokenizer's ids side by side, ``(B, E L)``: a token's position is found in the first
        L (every tokenizer puts it at the same place)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        ids = [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids for tokenizer in self.tokenizers]
        return torch.cat(ids, 1).to(device or self.device)

    def encode_text(self, input_ids: torch.Tensor) -> TextConditioning:
        """Token ids (:meth:`tokenize`) -> the UNet's text conditioning: SD1.x/SD2.x, the text encoder's last hidden
        states (as diffusers' StableDiffusionPipeline)."""
        return TextConditioning(self.text_encoder(input_ids)[0])

    def encode_negative(self, prompt: str) -> TextConditioning:
        """The conditioning of CFG's unconditional branch, one row (the negative prompt, "" by default)."""
        return self.encode_text(self.tokenize(prompt))

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
        _frozen([text_encoder, vae, unet], device, dtype)
        return cls(model_id, tokenizer, text_encoder, vae, unet, _scheduler_dict(scheduler_config), device, dtype,
                   extra={"base_vocab_size": base_vocab_size or len(tokenizer)})

    @classmethod
    def of_pipeline(cls, pipe, model_id: str | None = None) -> "Backbone":
        """The backbone that *is* a loaded diffusers pipeline's components (``StableDiffusionPipeline``, its Img2Img
        and Inpaint siblings, :class:`clic.pipeline.ClicPipeline`): the same module objects, not copies, left on
        their device and in their dtype. Its base vocabulary is the tokenizer's own, without tokens loaded since.

        An SDXL pipeline (``StableDiffusionXLPipeline`` and its siblings: ``text_encoder_2`` and ``tokenizer_2``)
        gives an :class:`SDXLBackbone`; its second text encoder is set to pool at the end-of-text token
        (:func:`fix_pooled_eos`, which changes no image of a prompt without added tokens)."""
        missing = [n for n in ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
                   if getattr(pipe, n, None) is None]
        if missing:
            raise ModelError(f"{type(pipe).__name__} has no {', '.join(missing)}: not a Stable Diffusion pipeline")
        name = str(model_id or getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__)
        modules = (pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, _scheduler_dict(pipe.scheduler.config),
                   pipe.unet.device, pipe.unet.dtype)
        extra = {"base_vocab_size": int(pipe.tokenizer.vocab_size)}
        if getattr(pipe, "text_encoder_2", None) is None:
            return cls(name, *modules, extra=extra)
        if getattr(pipe, "tokenizer_2", None) is None:
            raise ModelError(f"{type(pipe).__name__} has a text_encoder_2 but no tokenizer_2: not an SDXL pipeline")
        fix_pooled_eos(pipe.text_encoder_2, pipe.tokenizer_2)
        zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        return SDXLBackbone(name, *modules, extra=extra, tokenizer_2=pipe.tokenizer_2,
                            text_encoder_2=pipe.text_encoder_2, zero_empty_negative=zeros)


def _frozen(modules: list[torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    for module in modules:
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.requires_grad_(False).eval().to(device)


def _scheduler_dict(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


#: SDXL's second text encoder names its end-of-text token id 2 in the published config, a value transformers keeps
#: for old checkpoints: the pooled embedding is then taken at the *highest* token id of the prompt, which is the
#: end-of-text token only as long as no token was added (a placeholder's id is higher). See SDXLBackbone.
_LEGACY_EOS_ID = 2


@dataclass
class SDXLBackbone(Backbone):
    """The frozen parts of an SDXL pipeline: two tokenizers and text encoders (CLIP ViT-L, ``CLIPTextModel``; OpenCLIP
    bigG, ``CLIPTextModelWithProjection``), the VAE and a UNet with ``addition_embed_type="text_time"``.

    The text side as diffusers' ``StableDiffusionXLPipeline`` computes it: each encoder's penultimate hidden states,
    concatenated (cross-attention dim 768 + 1280 = 2048); the second encoder's projected end-of-text state as the
    pooled embedding; time ids (original size, crop top-left, target size) = (R, R, 0, 0, R, R) at the model
    resolution R, made once per device and dtype. An empty negative prompt is all zeros when the pipeline's config
    says ``force_zeros_for_empty_prompt`` (SDXL base does), as the stock pipeline with no negative prompt.

    The pooled embedding is taken at the end-of-text token also when the second encoder's config carries the old id
    (2, SDXL base's), with which transformers would take it at the prompt's highest id: v*'s, once v* is added (the
    stock pipeline given a concept by :func:`clic.stock.load_concept` gets the same correction).
    """

    family = "sdxl"
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    zero_empty_negative: bool = True

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def config_hash(self) -> str:
        blob = json.dumps(
            {"unet": _config_dict(self.unet.config), "vae": _config_dict(self.vae.config),
             # with the base vocabulary, as Backbone.config_hash: textual-inversion tokens resize both tables
             "text": {**_config_dict(self.text_encoder.config), "vocab_size": self.base_vocab_size},
             "text_2": {**_config_dict(self.text_encoder_2.config), "vocab_size": self.base_vocab_size},
             "vocab": self.base_vocab_size},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def weight_stats(self) -> list[float]:
        w = self.text_encoder_2.get_input_embeddings().weight[:1000].detach().float()
        return super().weight_stats() + [w.mean().item(), w.std().item()]

    def time_ids(self, device, dtype: torch.dtype) -> torch.Tensor:
        """``(1, 6)``: original size, crop top-left, target size = (R, R, 0, 0, R, R); made once per device/dtype."""
        cache = self.extra.setdefault("time_ids", {})
        key = (str(device), dtype)
        if key not in cache:
            size = (self.resolution, self.resolution)
            cache[key] = to_device(torch.tensor([[*size, 0, 0, *size]], dtype=dtype), device)
        return cache[key]

    def encode_text(self, input_ids: torch.Tensor) -> TextConditioning:
        """Token ids ``(B, 2 L)`` (:meth:`tokenize`) -> both encoders' penultimate hidden states side by side
        ``(B, L, D1 + D2)``, the pooled embedding ``(B, P)`` and the time ids (as ``StableDiffusionXLPipeline``)."""
        length = input_ids.shape[1] // 2
        hidden = []
        for k, encoder in enumerate(self.text_encoders):
            out = encoder(input_ids[:, k * length:(k + 1) * length], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds                                   # the second encoder's (with projection)
        return TextConditioning(torch.cat(hidden, -1), pooled, self.time_ids(pooled.device, pooled.dtype))

    def encode_negative(self, prompt: str) -> TextConditioning:
        cond = super().encode_negative(prompt)
        return cond.zeros_like() if prompt == "" and self.zero_empty_negative else cond

    @classmethod
    def from_sdxl_modules(cls, model_id: str, tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet,
                          scheduler_config: dict, device: torch.device, dtype: torch.dtype,
                          zero_empty_negative: bool = True, base_vocab_size: int | None = None) -> "SDXLBackbone":
        """The backbone of loaded (or built) SDXL modules: everything frozen, in eval mode, on ``device`` in
        ``dtype``; a ``ModelError`` if the UNet's added embedding does not fit the text encoder and time ids.
        ``base_vocab_size``: the base model's vocabulary (default: the tokenizer's size)."""
        expected = unet.config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
        if unet.add_embedding.linear_1.in_features != expected:
            raise ModelError(f"{model_id}: the UNet's added embedding takes {unet.add_embedding.linear_1.in_features} "
                             f"values, the text encoder and time ids give {expected}")
        if len(tokenizer) != len(tokenizer_2):
            raise ModelError(f"{model_id}: the two tokenizers differ in size ({len(tokenizer)}, {len(tokenizer_2)})")
        _frozen([text_encoder, text_encoder_2, unet], device, dtype)
        # the stock SDXL pipelines decode in fp32 when the VAE asks for it (it overflows in fp16)
        upcast = dtype == torch.float16 and vae.config.get("force_upcast", False)
        _frozen([vae], device, torch.float32 if upcast else dtype)
        fix_pooled_eos(text_encoder_2, tokenizer_2)
        return cls(model_id, tokenizer, text_encoder, vae, unet, _scheduler_dict(scheduler_config), device, dtype,
                   extra={"base_vocab_size": base_vocab_size or len(tokenizer)}, tokenizer_2=tokenizer_2,
                   text_encoder_2=text_encoder_2,
                   zero_empty_negative=bool(zero_empty_negative))


def fix_pooled_eos(text_encoder, tokenizer) -> None:
    """Make ``text_encoder`` pool at ``tokenizer``'s end-of-text token when its config has the old id (see
    :data:`_LEGACY_EOS_ID`): the same pooled embedding for every prompt without added tokens, the right one for a
    prompt with v*. The config (and so the architecture hash) is left as published."""
    model = getattr(text_encoder, "text_model", text_encoder)
    if getattr(model, "eos_token_id", None) == _LEGACY_EOS_ID and tokenizer.eos_token_id != _LEGACY_EOS_ID:
        model.eos_token_id = tokenizer.eos_token_id


def backbone_from_pipeline(model_id: str, pipe, device: torch.device, dtype: torch.dtype) -> Backbone:
    """The backbone of a diffusers pipeline object (e.g. one built by :func:`clic.builder.build_pipeline`)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLBackbone.from_sdxl_modules(
            model_id, pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet,
            pipe.scheduler.config, device, dtype, pipe.config.get("force_zeros_for_empty_prompt", True))
    return Backbone.from_modules(model_id, pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                                 pipe.scheduler.config, device, dtype)


def _is_local(model: str) -> bool:
    return os.path.isdir(model) or model.startswith((".", "/", "~"))


def load_backbone(model=DEFAULT_MODEL, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, timings: dict | None = None, *,
                  torch_dtype: torch.dtype | None = None, revision: str | None = None, variant: str | None = None,
                  token: str | bool | None = None, **hub_kwargs) -> Backbone:
    """Load tokenizer, text encoder, VAE and UNet of a diffusers checkpoint; everything frozen, eval mode.

    Args:
        model: a hub id (looked up in the local cache first; offline, a miss is a one-line error), a short name of
            :data:`MODEL_ALIASES` (``sdxl``), a local folder in the diffusers layout (``model_index.json``,
            ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), or a loaded pipeline
            (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and the like): its components are used as
            they are, moved to ``device`` and cast to ``dtype`` only if those are given. A folder with
            ``text_encoder_2/`` and ``tokenizer_2/`` (``StableDiffusionXLPipeline``), or such a pipeline, gives an
            :class:`SDXLBackbone`; its VAE stays fp32 under fp16 when its config asks for that (``force_upcast``:
            SDXL's VAE overflows in fp16).
        device: default cuda > mps > cpu (:func:`pick_device`); a pipeline's own device for a pipeline.
        dtype / torch_dtype: precision of the frozen parts (``"fp16"``, ``torch.float16``, ...; default fp32, or a
            pipeline's own); ``torch_dtype``, diffusers' name, wins when both are given.
        timings: filled with the seconds of each part (``tokenizer``, ``text_encoder``, ``vae``, ``unet``: reading
            and building each on the CPU in ``dtype``, SDXL's second text encoder counted with the first;
            ``to_device``: moving them to ``device`` and freezing them; for a loaded pipeline only ``to_device``).
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
        b, device = backbone, torch.device(device)
        if isinstance(b, SDXLBackbone):
            backbone = SDXLBackbone.from_sdxl_modules(b.model_id, b.tokenizer, b.tokenizer_2, b.text_encoder,
                                                      b.text_encoder_2, b.vae, b.unet, b.scheduler_config, device,
                                                      dtype, b.zero_empty_negative, base_vocab_size=b.base_vocab_size)
        else:
            backbone = Backbone.from_modules(b.model_id, b.tokenizer, b.text_encoder, b.vae, b.unet,
                                             b.scheduler_config, device, dtype, base_vocab_size=b.base_vocab_size)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)
        timings["to_device"] = clock() - t0
        return backbone
    device = pick_device(device) if not isinstance(device, torch.device) else device
    dtype = parse_dtype(torch_dtype or dtype or "fp32")
    model = str(model)
    local = _is_local(model)
    if not local:
        model = MODEL_ALIASES.get(model, model)
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
        index = _model_index(source, kw)
        sdxl = "text_encoder_2" in index or (local and (Path(source) / "text_encoder_2").is_dir())
        t0 = clock()
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        t1 = clock()
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **kw,
                                                     **weights)
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                         torch_dtype=dtype, **kw, **weights)
        # SDXL's VAE may have to stay fp32 under fp16 (from_sdxl_modules decides, by its config)
        vae_dtype = torch.float32 if sdxl and dtype == torch.float16 else dtype
        t2 = clock()
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype, **kw, **weights)
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
            "(e.g. one made by `clic make-model tiny DIR`, or `tiny-sdxl` for the SDXL layout)"
        ) from exc
    log.info("loaded %s on %s (%s)", model, device, dtype)
    t0 = clock()
    if not sdxl:
        backbone = Backbone.from_modules(model, tokenizer, text_encoder, vae, unet, scheduler_config, device, dtype)
    else:
        backbone = SDXLBackbone.from_sdxl_modules(model, tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae,
                                                  unet, scheduler_config, device, dtype,
                                                  index.get("force_zeros_for_empty_prompt", True))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["to_device"] = clock() - t0
    return backbone


def _model_index(source: str, kw: dict) -> dict:
    """The pipeline's ``model_index.json`` ({} for a folder without one)."""
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
        return {}
    with open(_resolve_file(source, "model_index.json", kw)) as f:
        return json.load(f)


def bundled_model() -> Path | None:
    """The toy model shipped in the package (``clic/assets/toymodel``), or None in a checkout without it."""
    path = Path(str(resources.files("clic") / "assets" / "toymodel"))
    return path if (path / "model_index.json").is_file() else None


def _resolve_file(source: str, relpath: str, kw: dict) -> str:
    if os.path.isdir(source):
        return os.path.join(source, relpath)
    folder, name = relpath.rsplit("/", 1) if "/" in relpath else (None, relpath)
    hub = {k: v for k, v in kw.items() if k in ("local_files_only", "revision", "token", "cache_dir")}
    return hf_hub_download(source, name, subfolder=folder, **hub)
