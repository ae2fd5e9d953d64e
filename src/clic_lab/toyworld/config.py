"""The toy model's recipe: one dataclass recorded in ``training.json`` (and the option list of
``python -m clic_lab.toyworld.train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

__all__ = ["ToyModelConfig"]


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ToyModelConfig:
    """Everything that decides the trained model (recorded in ``training.json``)."""

    seed: int = _opt(0, "seed of the dataset, the initial weights and the training noise")
    n_scenes: int = _opt(40000, "training scenes rendered once (split='train', 128x128)")
    size: int = _opt(128, "image side in pixels")
    threads: int = _opt(1, "torch CPU threads, and processes rendering the dataset")
    max_minutes: float = _opt(70.0, "wall-time budget of the whole run; the UNet phase stops early to keep it")
    # VAE
    vae_channels: Tuple[int, ...] = _opt((32, 64, 64), "AutoencoderKL block_out_channels (3 levels: 128 -> 32 px)")
    vae_norm_groups: int = _opt(4, "GroupNorm groups of the VAE")
    vae_steps: int = _opt(4000, "VAE optimiser steps at most")
    vae_minutes: float = _opt(45.0, "VAE phase wall-time cap (minutes)")
    vae_batch: int = _opt(32, "VAE batch size")
    vae_more_minutes: float = _opt(0.0, "with --resume, before the latents are encoded: train the saved VAE this "
                                        "many minutes more (fresh optimiser, half the learning rate)")
    init_vae: str = _opt("", "start from these VAE weights (a safetensors file written by --save-vae; its "
                             "architecture must match --vae-channels) instead of training a VAE")
    vae_crop: int = _opt(32, "VAE trains on random crops of this side (it is fully convolutional)")
    vae_lr: float = _opt(2e-3, "VAE learning rate (AdamW, cosine decay to 10%)")
    vae_kl: float = _opt(1e-6, "weight of the KL term (SD: 1e-6)")
    decoder_minutes: float = _opt(0.0, "after the UNet: fine-tune the VAE decoder alone (encoder, hence latents, "
                                       "unchanged) on whole images for this many minutes")
    decoder_lr: float = _opt(5e-4, "decoder fine-tuning learning rate (cosine decay to 10%)")
    decoder_batch: int = _opt(16, "decoder fine-tuning batch")
    decoder_crop: int = _opt(64, "decoder fine-tuning on random windows of this many pixels (0: whole images)")
    # text encoder
    text_hidden: int = _opt(64, "CLIPTextModel hidden size (= the UNet's cross_attention_dim)")
    text_layers: int = _opt(3, "CLIPTextModel layers")
    text_heads: int = _opt(4, "CLIPTextModel attention heads")
    # UNet
    init_diffusion: str = _opt("", "start the UNet and text encoder (weights and EMA) from a pipeline folder this "
                                   "trainer wrote (e.g. the shipped toy model) and count steps from its "
                                   "training.json: a run continues on another machine from committed weights (a "
                                   "fresh optimiser, warmed up again); ignored when OUT/work has a checkpoint")
    unet_channels: Tuple[int, ...] = _opt((32, 64, 128, 192), "UNet block_out_channels (32, 16, 8, 4 latent px)")
    unet_cross_levels: int = _opt(2, "UNet levels with cross-attention, counted from the lowest resolution (2: the "
                                     "8x8 and 4x4 levels and the mid-block; the 16x16 level's self-attention would "
                                     "cost ~45% more compute a step)")
    unet_heads: int = _opt(8, "UNet attention heads (diffusers' attention_head_dim)")
    unet_norm_groups: int = _opt(16, "GroupNorm groups of the UNet")
    unet_steps: int = _opt(100000, "UNet optimiser steps at most")
    unet_batch: int = _opt(32, "UNet batch size")
    unet_lr: float = _opt(5e-4, "UNet + text encoder learning rate (AdamW, constant after warm-up)")
    warmup: int = _opt(200, "learning-rate warm-up steps")
    ema: float = _opt(0.999, "EMA decay of the saved UNet and text-encoder weights")
    cond_drop: float = _opt(0.1, "probability of an empty caption (classifier-free guidance)")
    min_snr: float = _opt(5.0, "min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain epsilon MSE")
    # bookkeeping
    ckpt_minutes: float = _opt(15.0, "checkpoint (and pipeline export) interval (minutes)")
    threads_file: str = _opt("", "a file holding a thread count, re-read at every log line: change the training's "
                                 "threads while it runs (empty: --threads throughout)")
    detector: str = _opt("", "pattern-detector weights for the VAE report (empty: the shipped ones)")
    log_every: int = _opt(50, "log interval (steps)")
    vae_eval_n: int = _opt(500, "unseen scenes for the VAE's PSNR and detector-on-reconstruction numbers")
    grid_steps: int = _opt(50, "DDIM steps of the sample grid")
    grid_guidance: float = _opt(6.0, "CFG scale of the sample grid")
    dtype: str = _opt("fp16", "dtype of the saved weights (fp16 or fp32)")
    bf16: Optional[bool] = _opt(None, "bf16 autocast for the forward passes (fp32 weights and optimiser); default: on for a GPU "
                            "and for CPUs with native bf16 (AVX512-BF16/AMX), off elsewhere (emulated bf16 is ~10x slower)")
    device: str = _opt("cpu", "where the networks train: cpu or cuda (data, schedules and random draws stay on the CPU, "
                              "so the recipe is the same anywhere)")
