"""``ClicPipeline``: CLiC as a diffusers pipeline (learn a concept, transfer it, generate with it).

    pipe = ClicPipeline.from_pretrained("CompVis/stable-diffusion-v1-4", torch_dtype=torch.float16).to("cuda")
    ex = "src/clic/assets/examples/"                                            # the images shipped with clic
    pipe.learn(image=ex + "chair.png", mask_image=ex + "chair_mask.png", object_class="chair")  # or load_concept
    edited = pipe(image=ex + "toy_target.png", mask_image=ex + "toy_target_mask.png",
                  generator=torch.Generator().manual_seed(0))
    new = pipe.generate(object_class="table", num_images_per_prompt=4)
    edited.images[0], new.images                                                            # PIL by default

It follows diffusers' conventions: the components (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
``scheduler``; SDXL's ``text_encoder_2`` and ``tokenizer_2`` too), ``from_pretrained`` (hub id or folder;
``torch_dtype``, ``revision``, ``variant``, ``token``), ``from_pipe(stable_diffusion_pipeline)`` (or an SDXL
pipeline) to share an existing pipeline's components, ``.to(device)``, ``save_pretrained``, and calls with
diffusers' argument names (``image``, ``mask_image``, ``prompt``, ``negative_prompt``, ``num_inference_steps``,
``guidance_scale``, ``num_images_per_prompt``, ``generator``, ``output_type``) returning ``.images``. Every other
option of the job (the paper's ``t_start``, ``eta``, ...) is a keyword argument named as in :mod:`clic.config`, and
``config=`` takes a whole config.

The pipeline is a thin shell over the library: each call applies the concept for its duration
(:func:`clic.concept.applied_concept`) and runs :func:`clic.learn.learn`, :func:`clic.transfer.transfer` or
:func:`clic.generate.generate` on the pipeline's components, which are left as they were. Sampling uses the
``scheduler`` component (one of :data:`clic.models.SCHEDULERS`; a model's PNDM becomes the paper's DDIM, without
clipping); learning uses the model's own noise schedule. The ``clic`` command and the web page run their jobs
through it.

``generator``: clic draws each image from its own CPU generator seeded with its seed, so an image depends on its seed
only. A generator given here stands for its seed (``generator.initial_seed()``): one generator and
``num_images_per_prompt=n`` give the seeds s, s+1, ..., s+n-1; a list gives one seed per generator. Without a
generator the config's seeds are used (default: seed 0), so a call is reproducible.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .concept import Concept
from .config import GenerateConfig, LearnConfig, TransferConfig, generate_config, learn_config, transfer_config
from .errors import InputError, ModelError
from .generate import generate
from .imaging import heat_overlay, image_size, load_full_size, load_image, load_latent_mask, load_mask, to_pil
from .learn import LearnResult, learn
from .models import SCHEDULERS, Backbone, SDXLBackbone, fix_pooled_eos, load_backbone
from .stock import read_concept
from .transfer import paste_back, transfer

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class ClicPipelineOutput(BaseOutput):
    """What a transfer or a generation returns.

    Args:
        images: the N results (one per seed): a list of PIL images (``output_type="pil"``), an array ``(N, H, W, 3)``
            in [0, 1] (``"np"``), a tensor ``(N, 3, H, W)`` in [0, 1] (``"pt"``), or the final latents (``"latent"``).
            A transfer's results have the target's own size (see ``full_size``), a generation's the model resolution.
        seeds: the seed of each image.
        prompt: the prompt of the concept stage.
        attention: transfer only: CA(v*, x_t) of each result, averaged over the steps, ``(N, T, h, w)`` (T concept
            tokens in the prompt, h x w the latent size); None for a generation.
        result: the library's full result (:class:`clic.transfer.TransferResult` or
            :class:`clic.generate.GenerateResult`), e.g. ``result.images`` in [-1, 1] at the model resolution.
    """

    images: list | np.ndarray | torch.Tensor
    seeds: list
    prompt: str
    attention: torch.Tensor | None = None
    result: object = None

    def attention_overlays(self) -> list[PIL.Image.Image]:
        """v*'s attention over each result at the model resolution (red = high), as the CLI's ``--save-attention``."""
        if self.attention is None:
            raise InputError("a generation has no attention maps; transfer records them")
        return [heat_overlay(self.result.images[k], self.attention[k].mean(0)) for k in range(len(self.seeds))]


class ClicPipeline(DiffusionPipeline):
    """CLiC on the components of a Stable Diffusion model (see the module docstring).

    Args:
        vae, text_encoder, tokenizer, unet: a Stable Diffusion checkpoint's (SD1.x, SD2.x, SDXL layouts; frozen
            here).
        scheduler: the sampler of transfer and generation: DDIM, DDPM, Euler, Euler-ancestral or DPM-Solver++
            (any other, e.g. SD's PNDM, is replaced by DDIM from its config, ``clip_sample=False``, the paper's).
        text_encoder_2, tokenizer_2: SDXL's second text encoder and tokenizer (None for SD1.x/SD2.x); with them the
            library runs on a :class:`clic.models.SDXLBackbone` (the second encoder set to pool at its end-of-text
            token, :func:`clic.models.fix_pooled_eos`).
        force_zeros_for_empty_prompt: SDXL: an empty negative prompt is all zeros (SDXL base's setting).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: SchedulerMixin,
                 text_encoder_2: CLIPTextModelWithProjection | None = None, tokenizer_2: CLIPTokenizer | None = None,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ModelError("an SDXL model needs both text_encoder_2 and tokenizer_2 (got only one of them)")
        # learning draws its noise levels from the model's own schedule, whatever sampler is chosen later
        self._model_scheduler_config = _public(scheduler.config)
        if type(scheduler).__name__ not in SCHEDULERS.values():
            scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
        for module in (vae, text_encoder, text_encoder_2, unet):
            if module is not None:
                module.requires_grad_(False).eval()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        if text_encoder_2 is not None:
            fix_pooled_eos(text_encoder_2, tokenizer_2)
            self.register_to_config(force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
        self._base_vocab_size = int(tokenizer.vocab_size)
        self.concept: Concept | None = None

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None,
                        revision: str | None = None, variant: str | None = None, token: str | bool | None = None,
                        **kwargs) -> "ClicPipeline":
        """Load a Stable Diffusion checkpoint (hub id or diffusers folder) on the CPU, as diffusers does; move it with
        ``.to(device)``. Only the five components (SDXL: seven) are read (no safety checker): with ``variant="fp16"``
        SD1.4 is a 2.1 GB download. Other keyword arguments (``cache_dir``, ``local_files_only``, ...) go to each
        component's ``from_pretrained``. A model that cannot be loaded is a :class:`clic.errors.ModelError` with one
        line."""
        torch_dtype = torch_dtype or kwargs.pop("dtype", None)         # diffusers >= 0.36 also calls it dtype
        backbone = load_backbone(pretrained_model_name_or_path, device="cpu", torch_dtype=torch_dtype or torch.float32,
                                 revision=revision, variant=variant, token=token, **kwargs)
        return cls.from_backbone(backbone)

    @classmethod
    def from_backbone(cls, backbone: Backbone, scheduler: str = "ddim") -> "ClicPipeline":
        """The pipeline on a loaded :class:`clic.models.Backbone`'s modules (shared, not copied), sampling with
        ``scheduler`` (a name of :data:`clic.models.SCHEDULERS`)."""
        xl = {}
        if isinstance(backbone, SDXLBackbone):
            xl = {"text_encoder_2": backbone.text_encoder_2, "tokenizer_2": backbone.tokenizer_2,
                  "force_zeros_for_empty_prompt": backbone.zero_empty_negative}
        pipe = cls(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                   unet=backbone.unet, scheduler=backbone.sampling_scheduler(scheduler), **xl)
        pipe.register_to_config(_name_or_path=backbone.model_id)
        pipe._model_scheduler_config = dict(backbone.scheduler_config)
        pipe._base_vocab_size = backbone.base_vocab_size
        return pipe

    @property
    def backbone(self) -> Backbone:
        """The components as clic's library takes them (the same modules), with the model's noise schedule: an
        :class:`clic.models.SDXLBackbone` when the pipeline has SDXL's second text encoder."""
        args = (str(self.name_or_path or type(self).__name__), self.tokenizer, self.text_encoder, self.vae, self.unet,
                dict(self._model_scheduler_config), self._execution_device, self.unet.dtype)
        extra = {"base_vocab_size": self._base_vocab_size}
        if getattr(self, "text_encoder_2", None) is None:
            return Backbone(*args, extra=extra)
        return SDXLBackbone(*args, extra=extra, tokenizer_2=self.tokenizer_2, text_encoder_2=self.text_encoder_2,
                            zero_empty_negative=bool(self.config.get("force_zeros_for_empty_prompt", True)))

    @property
    def resolution(self) -> int:
        """The model's image size R (the latent size times the VAE's downsampling)."""
        return self.backbone.resolution

    def _sampling_backbone(self) -> tuple[Backbone, str]:
        """(the backbone whose sampling schedulers are built like ``self.scheduler``, that scheduler's name)."""
        name = next((k for k, v in SCHEDULERS.items() if v == type(self.scheduler).__name__), None)
        if name is None:
            raise InputError(f"the scheduler {type(self.scheduler).__name__} is not one clic samples with; use one "
                             f"of {', '.join(SCHEDULERS.values())}")
        return dataclasses.replace(self.backbone, scheduler_config=_public(self.scheduler.config)), name

    # -- the concept ------------------------------------------------------------------------------------------
    def load_concept(self, concept) -> Concept:
        """Use ``concept`` (a concept file made by ``clic learn``, a folder made by ``clic export-diffusers``, or a
        :class:`clic.concept.Concept`) in the following calls. It is checked against the model; nothing is installed
        on the components: each call applies it for its duration."""
        concept, name = read_concept(concept)
        concept.check_base(self.backbone, name)
        self.concept = concept
        return concept

    def unload_concept(self) -> None:
        self.concept = None

    def _the_concept(self) -> Concept:
        if self.concept is None:
            raise InputError("no concept loaded: pipe.load_concept(path) or pipe.learn(...) first")
        return self.concept

    # -- learning (sec. 3.1) ----------------------------------------------------------------------------------
    def learn(self, image, mask_image, object_class: str | None = None, prompt: str | None = None,
              config: LearnConfig | None = None, recipe: str = "paper", out_path=None,
              callback: Callable[[int, dict], None] | None = None, **options) -> LearnResult:
        """Learn a concept from source images and masks (paper sec. 3.1) and load it for the following calls.

        Args:
            image: a source image (file, PIL, numpy array, tensor in [0, 1]) or a list of images of one concept.
            mask_image: its mask (white = the concept), or a list: one per image, or several for one image (one
                token each, <v1*>, <v2*>, ...).
            object_class, prompt: OBJECT and P_s (default 'a OBJECT with <v*> style').
            config / recipe / options: the :class:`clic.config.LearnConfig` (default: ``recipe``'s, e.g. "paper"
                or "official"), its fields overridden by keyword arguments (``steps=300``, ``lr=...``).
            out_path: also write the concept file there (with its JSON-lines log and checkpoints).
            callback: ``callback(step, {"loss", "l_con", "l_att", "l_roi", ...})`` after every step.
        Returns the :class:`clic.learn.LearnResult` (``.concept``, ``.history``).
        """
        given = {k: v for k, v in dict(options, object_class=object_class, prompt=prompt).items() if v is not None}
        cfg = dataclasses.replace(config, **given) if config is not None else learn_config(recipe, **given)
        groups = _source_groups(image, mask_image)
        cfg.check(len(groups[0][1]))
        backbone = self.backbone
        size = backbone.resolution
        # as the command reads its files: the recipe's fit, binary masks unless cfg.binary_masks is off
        threshold = cfg.mask_threshold if cfg.binary_masks else None
        images = [load_image(src, size, cfg.image_fit) for src, _ in groups]
        masks = [torch.cat([load_mask(m, size, image_size(src), threshold, fit=cfg.image_fit) for m in ms])
                 for src, ms in groups]
        log_path = Path(out_path).with_suffix(".log.jsonl") if out_path is not None else None
        result = learn(backbone, images, masks, cfg, out_path=out_path, log_path=log_path, progress=self._progress(),
                       callback=callback)
        self.concept = result.concept
        return result

    # -- transfer (sec. 3.2) ----------------------------------------------------------------------------------
    def transfer(self, image, mask_image, prompt: str | None = None, negative_prompt: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 num_images_per_prompt: int | None = None, generator=None, output_type: str = "pil",
                 config: TransferConfig | None = None, recipe: str = "paper", full_size: bool = True,
                 callback: Callable[[dict], None] | None = None, **options) -> ClicPipelineOutput:
        """Transfer the loaded concept into the region ``mask_image`` of ``image`` (paper sec. 3.2).

        Args:
            image, mask_image: the target I_tg and its mask M_tg (white = the region to edit): files, PIL images,
                numpy arrays, tensors in [0, 1]; same aspect ratio. The model sees their centre crop at its resolution.
            prompt: with the concept's token (default: the concept's training prompt).
            negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, generator, output_type: as
                in diffusers (see the module docstring for ``generator``).
            config / recipe / options: the :class:`clic.config.TransferConfig` (default: ``recipe``'s), its fields
                overridden by keyword arguments: ``t_start`` (paper, default 15 of 50), ``strength`` (img2img's),
                ``eta`` (attention guidance, eq. 7), ``composite``, ...
            full_size: results at the target's own size (the model's crop scaled back and composited into it; outside
                the feathered mask every pixel is the target's). False: the model resolution.
            callback: after every denoising step, with the dict of :func:`clic.transfer.transfer`.
        """
        concept = self._the_concept()
        backbone, sampler = self._sampling_backbone()
        cfg = config if config is not None else transfer_config(recipe, **{k: v for k, v in options.items()
                                                                          if v is not None})
        if config is not None and options:
            cfg = dataclasses.replace(cfg, **{k: v for k, v in options.items() if v is not None})
        cfg = self._sampling_options(cfg, sampler, prompt, negative_prompt, num_inference_steps, guidance_scale,
                                     num_images_per_prompt, generator)
        cfg.check()
        size = backbone.resolution
        target = load_image(image, size)
        mask = mask_image if _is_model_mask(mask_image, size) else load_mask(mask_image, size, image_size(image),
                                                                               cfg.mask_threshold)
        # the official recipe's blending mask: the mask's grey levels resized straight to the latent size
        blend_mask = None
        if cfg.blend_mask == "bicubic" and not _is_model_mask(mask_image, size):
            blend_mask = load_latent_mask(mask_image, (backbone.latent_size, backbone.latent_size))
        result = transfer(backbone, concept, target, mask, cfg, progress=self._progress(), callback=callback,
                          blend_mask=blend_mask)
        images = result.images
        if full_size and cfg.composite and not _is_model_mask(mask_image, size):
            original, original_mask = load_full_size(image, mask_image, cfg.mask_threshold)
            if original.shape[-2:] != images.shape[-2:]:
                radius = cfg.feather if cfg.feather is not None else size // 64
                images = paste_back(result.decoded, original, original_mask,
                                    round(radius * min(original.shape[-2:]) / size))
        attention = result.attention.mean(0)                       # (N, T, h, w): over the steps
        return ClicPipelineOutput(_output(images, result.latents, output_type), result.seeds, result.prompt,
                                  attention, result)

    # -- generation (sec. 4.1) --------------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, object_class: str | None = None, negative_prompt: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 num_images_per_prompt: int | None = None, generator=None, output_type: str = "pil",
                 base_steps: int | None = None, config: GenerateConfig | None = None, recipe: str = "paper",
                 callback: Callable[[dict], None] | None = None, **options) -> ClicPipelineOutput:
        """New objects carrying the loaded concept: two-stage sampling (paper sec. 4.1), the base model for the first
        ``base_steps`` (t_s, default 5 of 50) steps; ``base_steps=0`` is plain text-to-image with the concept, equal
        to a stock ``StableDiffusionPipeline`` with the concept loaded (:func:`clic.stock.load_concept`).

        ``prompt`` may hold ``{object}`` and ``{token}`` (default 'a photo of {object}, with {token} style'),
        ``object_class`` default the concept's. The other arguments as in :meth:`transfer`.
        """
        concept = self._the_concept()
        backbone, sampler = self._sampling_backbone()
        given = {k: v for k, v in dict(options, object_class=object_class, base_steps=base_steps).items()
                 if v is not None}
        cfg = dataclasses.replace(config, **given) if config is not None else generate_config(recipe, **given)
        cfg = self._sampling_options(cfg, sampler, prompt, negative_prompt, num_inference_steps, guidance_scale,
                                     num_images_per_prompt, generator)
        cfg.check()
        result = generate(backbone, concept, cfg, progress=self._progress(), callback=callback)
        return ClicPipelineOutput(_output(result.images, result.latents, output_type), result.seeds, result.prompt,
                                  None, result)

    def __call__(self, image=None, mask_image=None, **kwargs) -> ClicPipelineOutput:
        """:meth:`transfer` when ``image`` and ``mask_image`` are given, else :meth:`generate`."""
        if image is not None or mask_image is not None:
            if image is None or mask_image is None:
                raise InputError("a transfer needs both image and mask_image")
            return self.transfer(image, mask_image, **kwargs)
        return self.generate(**kwargs)

    # -- shared -----------------------------------------------------------------------------------------------
    def _progress(self) -> bool:
        return not getattr(self, "_progress_bar_config", {}).get("disable", False)

    @staticmethod
    def _sampling_options(cfg, sampler: str, prompt, negative_prompt, steps, guidance_scale, num, generator):
        """``cfg`` with diffusers' arguments, where given, and the pipeline's sampler."""
        given = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                 "guidance_scale": guidance_scale}
        values = {k: v for k, v in given.items() if v is not None}
        if generator is not None or num is not None:
            values.update(seeds=tuple(seeds_for(generator, num, cfg.seed_list()[0])), num=None)
        return dataclasses.replace(cfg, scheduler=sampler, **values)


def seeds_for(generator, num: int | None, default: int = 0) -> list[int]:
    """The seeds of ``num`` images from diffusers' ``generator`` argument (see the module docstring)."""
    if isinstance(generator, (list, tuple)):
        if num is not None and num != len(generator):
            raise InputError(f"{len(generator)} generators for num_images_per_prompt={num}")
        return [int(g.initial_seed()) for g in generator]
    first = int(generator.initial_seed()) if generator is not None else int(default)
    return [first + k for k in range(num or 1)]


def _output(images: torch.Tensor, latents: torch.Tensor, output_type: str):
    """Images ``(N, 3, H, W)`` in [-1, 1] as diffusers' ``output_type`` asks."""
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if output_type == "latent":
        return latents
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return unit
    if output_type == "np":
        return unit.permute(0, 2, 3, 1).numpy()
    return [to_pil(x) for x in images]


def _is_model_mask(mask, size: int) -> bool:
    """A binary mask tensor already at the model resolution (e.g. found by RoI matching), used as it is."""
    return isinstance(mask, torch.Tensor) and tuple(mask.shape[-2:]) == (size, size) and mask.numel() == size * size


def _source_groups(image, mask_image) -> list[tuple[object, list]]:
    """``(image, its masks)``: one image with one mask per concept token, or one mask per image of one concept."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    masks = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    if len(images) == 1:
        return [(images[0], masks)]
    if len(images) == len(masks):
        return [(i, [m]) for i, m in zip(images, masks)]
    raise InputError(f"got {len(images)} images and {len(masks)} masks: give one mask per image, or several masks "
                     "for a single image (one concept each)")


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
