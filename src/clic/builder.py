"""Build Stable-Diffusion-layout pipelines offline, with random weights.

No weights can be downloaded in our CI, so tests and benchmarks run on pipelines built here:

- ``tiny``: a few M parameters, SD1 layout, 64 px images, seconds on a CPU (tests);
- ``micro``: ``tiny`` with one UNet level and one text layer (the tests that compile the models);
- ``tiny-sd2``: the SD2 layout in small (linear projections, per-block head dims, v-prediction, "!" padding);
- ``sd14-random``: the exact SD1.4 architecture (UNet 860 M, CLIP ViT-L/14 text encoder, VAE) for speed
  and memory measurements, which do not depend on the weight values;
- ``tiny-inpaint`` and ``sd-inpaint-random``: the same as ``tiny`` and ``sd14-random`` in the Stable Diffusion
  *inpainting* layout (``StableDiffusionInpaintPipeline``, a 9-channel UNet input: latent, mask, masked-image
  latent), the base of the RealFill baseline (:mod:`clic.baselines.realfill`);
- ``tiny-sdxl``: the SDXL layout in small (``StableDiffusionXLPipeline``: two text encoders, the second with a
  projection, their hidden states concatenated; ``text_time`` added conditioning; no attention at the finest level,
  transformer depth growing towards the coarsest; linear projections; 64 px), for tests;
- ``tiny-sdxl-inpaint``: ``tiny-sdxl`` in SDXL's inpainting layout (``StableDiffusionXLInpaintPipeline``, the
  9-channel UNet input), the base of RealFill on SDXL;
- ``sdxl-random``: the exact SDXL base architecture (UNet 2.6 B, CLIP ViT-L and OpenCLIP bigG text encoders, VAE;
  1024 px, 128x128 latents) for speed and memory measurements.

Every pipeline uses the real CLIP BPE tokenizer (49408 tokens), rebuilt from the vocabulary that ships in
the ``open-clip-torch`` PyPI package (installed with ``--no-deps``: only its data file is read, the package
is never imported). SDXL's second tokenizer (OpenCLIP bigG's) is the same BPE vocabulary, padded with "!".
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelError

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256.

    The insertion order (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def find_bpe_vocab() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside an installed PyPI package (without importing it)."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            path = Path(root) / _BPE_FILE
            if path.is_file():
                return path
    raise ModelError(
        f"the CLIP BPE vocabulary ({_BPE_FILE}) was not found; install it with "
        "`pip install --no-deps open-clip-torch`"
    )


def build_clip_tokenizer(pad_token: str = EOS):
    """The Stable Diffusion (CLIP ViT-L/14) tokenizer, built offline from the open-clip BPE merges.

    Vocabulary order as in CLIP: 256 byte symbols, the same with ``</w>``, 48894 merges, then the
    start and end tokens (ids 49406, 49407). SD1.x pads with the end token, SD2.x with "!".
    """
    lines = gzip.open(find_bpe_vocab()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(vocab) == CLIP_VOCAB_SIZE
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=77,
    )


# ----------------------------------------------------------------------------------------------------------
# Architectures. SD1.4 numbers are the published configs of CompVis/stable-diffusion-v1-4.

_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)

#: The tiny kinds' VAE. Its scaling factor is latent_scaling_factor() of the seed-0 random VAE (4.68; tests check
#: it), not SD's 0.18215: with that the random VAE's latents have std ~0.04, the UNet sees almost nothing of the
#: image after noising, and neither attention maps nor losses can follow its content. A constant, not computed per
#: seed: checkpoints of one kind keep one architecture hash (concept files tell them apart by their weights).
TINY_VAE = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(32, 32, 64), norm_num_groups=32, scaling_factor=4.68,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)

SPECS: dict[str, dict] = {
    "tiny": dict(
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
        ),
        vae=TINY_VAE,
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=32, hidden_act="quick_gelu"),
        scheduler=dict(prediction_type="epsilon"),
        pad_token=EOS,
    ),
    # the smallest UNet with cross-attention (one level, no mid block) and a one-layer text encoder: for the tests
    # that compile or trace the models, whose cost grows with the number of layers
    "micro": dict(
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32,),
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
        ),
        vae=TINY_VAE,
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  projection_dim=32, hidden_act="quick_gelu"),
        scheduler=dict(prediction_type="epsilon"),
        pad_token=EOS,
    ),
    "tiny-sd2": dict(
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=48, attention_head_dim=(8, 16), use_linear_projection=True, norm_num_groups=32,
        ),
        vae=TINY_VAE,
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=48, hidden_act="gelu"),
        scheduler=dict(prediction_type="v_prediction"),
        pad_token="!",
    ),
    "sd14-random": dict(
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        ),
        vae=dict(
            sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu"),
        scheduler=dict(prediction_type="epsilon"),
        pad_token=EOS,
    ),
}


#: SDXL base's scheduler config (EulerDiscreteScheduler; DDIM and the others are built from it as from SD1's)
_SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
    timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
)
#: keys of SDXL base's scheduler config that Euler ignores and DDIM reads (set_alpha_to_one's default is True)
_SDXL_SCHEDULER_EXTRA = dict(set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False, sample_max_value=1.0)
#: the special-token ids SDXL base's text encoder configs carry (transformers' values of old checkpoints; see
#: clic.models.fix_pooled_eos)
_SDXL_TEXT_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)

SPECS["tiny-sdxl"] = dict(
    unet=dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=6 * 16 + 32, norm_num_groups=32,
    ),
    vae=TINY_VAE,
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
              hidden_act="quick_gelu"),
    text_2=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                hidden_act="gelu"),
    sdxl=True,
)
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): its published configs
SPECS["sdxl-random"] = dict(
    unet=dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    ),
    vae=dict(
        sample_size=1024, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.13025, force_upcast=True,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu"),
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu"),
    sdxl=True,
)


def _inpainting(kind: str) -> dict:
    """The spec of ``kind`` in the SD inpainting layout: UNet input = [x_t (4), mask (1), masked-image latent (4)]."""
    spec = dict(SPECS[kind])
    spec["unet"] = {**spec["unet"], "in_channels": 2 * spec["vae"]["latent_channels"] + 1}
    spec["inpainting"] = True
    return spec


SPECS["tiny-inpaint"] = _inpainting("tiny")
SPECS["sd-inpaint-random"] = _inpainting("sd14-random")  # SD1.x-inpainting architecture (runwayml / SD1.5)
SPECS["tiny-sdxl-inpaint"] = _inpainting("tiny-sdxl")    # SDXL's inpainting layout in small (RealFill on SDXL)


def latent_scaling_factor(vae, n: int = 8, seed: int = 0) -> float:
    """1 / std of ``vae``'s latents (posterior means) over seeded images from smooth blobs to pixel noise: the factor
    that gives unit-variance latents, as SD's 0.18215 does for SD's VAE.

    A random-init VAE with SD's factor gives latents of std ~0.04; noised to any t > 0 the UNet then sees almost
    nothing of the image, and neither attention maps nor losses can follow its content (see :data:`TINY_VAE`)."""
    g = torch.Generator().manual_seed(seed)
    size = vae.config.sample_size
    cells = [2 ** (2 + k % 4) for k in range(n)]                   # 4, 8, 16, 32 cells per side, then again
    images = torch.cat([F.interpolate(torch.rand(1, 3, c, c, generator=g), size=(size, size), mode="bilinear",
                                      align_corners=False) for c in cells]) * 2 - 1
    with torch.no_grad():
        std = float(vae.encode(images).latent_dist.mean.std())
    return round(1.0 / std, 4)


def _text_encoder(cls, text: dict, **ids):
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, layer_norm_eps=1e-5,
                            **(ids or dict(bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1,
                                           pad_token_id=1)), **text)
    return cls(config)


def build_pipeline(kind: str, seed: int = 0, device: str | torch.device | None = None):
    """A random-init ``StableDiffusionPipeline`` (``StableDiffusionInpaintPipeline`` for the inpainting kinds,
    ``StableDiffusionXLPipeline`` for the SDXL ones) of one of :data:`SPECS` (seeded per component). ``device``: where
    the weights are made, e.g. ``meta`` (shapes without values: what counting FLOPs and memory needs, in no time)."""
    # diffusers' pipeline classes import transformers' image processors (stderr warnings without torchvision): only
    # when a pipeline is built
    from diffusers import (EulerDiscreteScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)

    if kind not in SPECS:
        raise ModelError(f"unknown model kind {kind!r}; choose one of {', '.join(SPECS)}")
    spec = SPECS[kind]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec["unet"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**spec["vae"])
        torch.manual_seed(seed + 2)
        if spec.get("sdxl"):
            text_encoder = _text_encoder(CLIPTextModel, spec["text"], **_SDXL_TEXT_IDS)
            torch.manual_seed(seed + 3)
            text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, spec["text_2"], **_SDXL_TEXT_IDS)
        else:
            text_encoder = _text_encoder(CLIPTextModel, spec["text"])
    if spec.get("sdxl"):
        scheduler = EulerDiscreteScheduler(**_SDXL_SCHEDULER, prediction_type="epsilon")
        scheduler.register_to_config(**_SDXL_SCHEDULER_EXTRA)
        parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                     tokenizer=build_clip_tokenizer(EOS), tokenizer_2=build_clip_tokenizer("!"), unet=unet,
                     scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
        if spec.get("inpainting"):       # as SDXL's inpainting checkpoint: the base's six time ids, no aesthetic score
            return StableDiffusionXLInpaintPipeline(**parts, requires_aesthetics_score=False)
        return StableDiffusionXLPipeline(**parts)
    scheduler = PNDMScheduler(**_SCHEDULER, **spec["scheduler"])
    pipeline_cls = StableDiffusionInpaintPipeline if spec.get("inpainting") else StableDiffusionPipeline
    return pipeline_cls(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(spec["pad_token"]), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_model(kind: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str = "fp32") -> Path:
    """Write a random-init pipeline in the standard diffusers folder layout (safetensors weights)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out}: folder exists and is not empty")
    pipe = build_pipeline(kind, seed=seed)
    if dtype != "fp32":
        pipe.to(dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    tmp = out.with_name(out.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    log.info("wrote %s model to %s (UNet %.1f M parameters)", kind, out, n_unet / 1e6)
    return out
