"""Train the toy text-to-image model: a small Stable-Diffusion-layout pipeline learned on the toy world.

No pretrained diffusion weights can be downloaded here, so the project trains its own: an AutoencoderKL
(64x64 RGB <-> 16x16x4 latents), then a UNet2DConditionModel (cross-attention in the down, mid and up blocks)
and a small CLIPTextModel jointly on ``render_scene(split="train")`` captions, with the standard
epsilon-prediction DDPM loss (1000 steps, SD's scaled-linear betas) and 10% caption dropout for classifier-free
guidance. The result is a diffusers ``StableDiffusionPipeline`` folder with the real CLIP tokenizer, so
:func:`clic.models.load_backbone` and every feature of clic treat it exactly like SD1.4.

::

    python -m clic_lab.toyworld.train --out runs/toymodel --max-minutes 72 --vae-minutes 14   # train (background it)
    python -m clic_lab.toyworld.train --out runs/toymodel --resume              # continue after a crash
    python -m clic_lab.toyworld.train --evaluate src/clic/assets/toymodel       # measure how well it draws

Phases (each is skipped on ``--resume`` when its output exists in ``OUT/work/``): render the dataset once
(numpy arrays), train the VAE on random crops, encode every image to latents once, train UNet + text encoder
(EMA weights are what gets saved), write the pipeline (fp16 safetensors), a loss curve, a sample grid and
``training.json``. Everything runs on the CPU with ``--threads`` threads (default 1), or the networks on a GPU with
``--device cuda`` (same recipe: data and random draws stay on the CPU). ``--decoder-minutes``
adds an optional last phase that fine-tunes the VAE decoder alone (the latents stay valid).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .world import (CLASSES, COLOURS, HELD_OUT_COMBOS, PATTERN_ADJECTIVES, PATTERNABLE_PARTS, TRAIN_PATTERNS, allowed_pairs,
                    render_scene, scene_seeds)

log = logging.getLogger("clic_lab.toyworld.train")

__all__ = ["ToyModelConfig", "train_toy_model", "evaluate_toy_model", "generate", "sample_grid", "main",
           "GRID_PROMPTS", "foreground_mask", "part_region"]


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ToyModelConfig:
    """Everything that decides the trained model (recorded in ``training.json``)."""

    seed: int = _opt(0, "seed of the dataset, the initial weights and the training noise")
    n_scenes: int = _opt(20000, "training scenes rendered once (split='train', 64x64)")
    size: int = _opt(64, "image side in pixels")
    threads: int = _opt(1, "torch CPU threads, and processes rendering the dataset")
    max_minutes: float = _opt(70.0, "wall-time budget of the whole run; the UNet phase stops early to keep it")
    # VAE
    vae_channels: Tuple[int, ...] = _opt((16, 32, 64), "AutoencoderKL block_out_channels (3 levels: 64 -> 16 px)")
    vae_norm_groups: int = _opt(4, "GroupNorm groups of the VAE")
    vae_steps: int = _opt(4000, "VAE optimiser steps at most")
    vae_minutes: float = _opt(14.0, "VAE phase wall-time cap (minutes)")
    vae_batch: int = _opt(32, "VAE batch size")
    vae_crop: int = _opt(32, "VAE trains on random crops of this side (it is fully convolutional)")
    vae_lr: float = _opt(2e-3, "VAE learning rate (AdamW, cosine decay to 10%)")
    vae_kl: float = _opt(1e-6, "weight of the KL term (SD: 1e-6)")
    decoder_minutes: float = _opt(0.0, "after the UNet: fine-tune the VAE decoder alone (encoder, hence latents, "
                                       "unchanged) on whole images for this many minutes")
    decoder_lr: float = _opt(5e-4, "decoder fine-tuning learning rate (cosine decay to 10%)")
    decoder_batch: int = _opt(8, "decoder fine-tuning batch (whole 64x64 images)")
    # text encoder
    text_hidden: int = _opt(64, "CLIPTextModel hidden size (= the UNet's cross_attention_dim)")
    text_layers: int = _opt(3, "CLIPTextModel layers")
    text_heads: int = _opt(4, "CLIPTextModel attention heads")
    # UNet
    unet_channels: Tuple[int, ...] = _opt((48, 96, 128), "UNet block_out_channels (16, 8, 4 latent px)")
    unet_heads: int = _opt(8, "UNet attention heads (diffusers' attention_head_dim)")
    unet_norm_groups: int = _opt(16, "GroupNorm groups of the UNet")
    unet_steps: int = _opt(20000, "UNet optimiser steps at most")
    unet_batch: int = _opt(32, "UNet batch size")
    unet_lr: float = _opt(6e-4, "UNet + text encoder learning rate (AdamW, constant after warm-up)")
    warmup: int = _opt(200, "learning-rate warm-up steps")
    ema: float = _opt(0.999, "EMA decay of the saved UNet and text-encoder weights")
    cond_drop: float = _opt(0.1, "probability of an empty caption (classifier-free guidance)")
    min_snr: float = _opt(5.0, "min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain epsilon MSE")
    # bookkeeping
    ckpt_minutes: float = _opt(5.0, "checkpoint interval (minutes)")
    log_every: int = _opt(50, "log interval (steps)")
    vae_eval_n: int = _opt(500, "unseen scenes for the VAE's PSNR and detector-on-reconstruction numbers")
    grid_steps: int = _opt(50, "DDIM steps of the sample grid")
    grid_guidance: float = _opt(6.0, "CFG scale of the sample grid")
    dtype: str = _opt("fp16", "dtype of the saved weights (fp16 or fp32)")
    bf16: bool = _opt(True, "bf16 autocast for the forward passes (fp32 weights and optimiser; ~1.5x faster on CPUs with AVX512-BF16)")
    device: str = _opt("cpu", "where the networks train: cpu or cuda (data, schedules and random draws stay on the CPU, "
                              "so the recipe is the same anywhere)")


SCHEDULER_CONFIG = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    prediction_type="epsilon", trained_betas=None, timestep_spacing="leading",
)

#: Prompts of the sample grid: every class plain and with training patterns on its training parts.
GRID_PROMPTS: List[str] = [
    "a red chair", "a blue chair with a striped back", "a yellow chair with a dotted back", "a green chair with a checkered back",
    "a white house", "a blue house with brick walls", "a brown house with a gridded roof", "a yellow house with zigzag walls",
    "a teal vase", "an orange vase with a wavy body", "a purple vase with an argyle body", "a black vase with a hatched body",
    "a pink lamp", "a green lamp with a striped shade", "a red lamp with a checkered shade", "a blue lamp with a dotted shade",
    "a gray table", "a brown table with a gridded top", "an orange table with a brick top", "a teal table with a wavy top",
    "a yellow mug", "a red mug with a dotted body", "a blue mug with a zigzag body", "a green mug with a striped body",
]


# ------------------------------------------------------------------------------------------------- models


def build_vae(cfg: ToyModelConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=cfg.size, layers_per_block=1,
        block_out_channels=tuple(cfg.vae_channels), norm_num_groups=cfg.vae_norm_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        mid_block_add_attention=False,
    )
    # Start with a near-deterministic posterior (std ~ 0.02): with SD's tiny KL weight the default std of 1
    # drowns the encoder's signal for the first few hundred steps.
    with torch.no_grad():
        vae.quant_conv.bias[4:].fill_(-8.0)
    return vae


def build_text_encoder(cfg: ToyModelConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    from clic.builder import CLIP_VOCAB_SIZE

    conf = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, projection_dim=cfg.text_hidden, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=1,
    )
    return CLIPTextModel(conf)


def build_unet(cfg: ToyModelConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    latent = cfg.size // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads, norm_num_groups=cfg.unet_norm_groups,
    )


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------------- data


def _render_chunk(seeds: List[int], size: int, split: str) -> Tuple[np.ndarray, List[str]]:
    scenes = [render_scene(s, size=size, split=split) for s in seeds]
    return np.stack([sc.image for sc in scenes]), [sc.caption for sc in scenes]


def render_dataset(n: int, seed: int, size: int = 64, split: str = "train",
                   workers: int = 1) -> Tuple[np.ndarray, List[str]]:
    """``n`` scenes with seeds :func:`scene_seeds` ``(n, seed)``: ``(n, size, size, 3)`` uint8 and captions; the
    same arrays with any number of ``workers`` (processes)."""
    seeds = scene_seeds(n, seed)
    chunk = 1000
    parts = [seeds[i:i + chunk] for i in range(0, n, chunk)]
    images, captions = np.empty((n, size, size, 3), dtype=np.uint8), []
    if workers > 1 and len(parts) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(parts))) as pool:
            results = pool.map(_render_chunk, parts, [size] * len(parts), [split] * len(parts))
    else:
        results = (_render_chunk(part, size, split) for part in parts)
    for i, (imgs, caps) in enumerate(results):
        images[i * chunk: i * chunk + len(imgs)] = imgs
        captions += caps
        if (i + 1) % 5 == 0:
            log.info("rendered %d/%d scenes", len(captions), n)
    return images, captions


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_device(name: str) -> torch.device:
    """``cfg.device`` checked: a one-line error when CUDA is asked for and absent."""
    from clic.errors import InputError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device (cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def _to_pixels(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR (dB) over images of uint8 arrays ``(N, H, W, 3)``."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = d.reshape(len(a), -1).mean(1).clip(1e-10)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))


# -------------------------------------------------------------------------------------------------- VAE


def _cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train_vae(vae, images: np.ndarray, cfg: ToyModelConfig, deadline: float, gen: torch.Generator,
              history: list) -> int:
    """L1 + MSE + KL on random crops (and flips); stops at ``cfg.vae_steps`` or ``deadline`` (time.time())."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    dev = _device_of(vae)
    data = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 view
    c = cfg.vae_crop
    start = time.time()
    # the schedule assumes the step cap; if the time cap comes first, the last steps still run at a low rate
    total = cfg.vae_steps
    step = 0
    while step < cfg.vae_steps and time.time() < deadline:
        if step == 20:  # re-plan the cosine schedule to the steps that fit before the deadline
            rate = (time.time() - start) / 20
            total = int(min(cfg.vae_steps, 20 + (deadline - time.time()) / rate))
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, total, cfg.vae_lr)
        idx = torch.randint(0, len(data), (cfg.vae_batch,), generator=gen)
        x = data[idx].float() / 127.5 - 1.0
        if c < cfg.size:
            i, j = torch.randint(0, cfg.size - c + 1, (2,), generator=gen).tolist()
            x = x[:, :, i:i + c, j:j + c]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        x = x.to(dev)
        with _autocast(dev, cfg.bf16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
            rec = vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        kl = post.kl().float().mean()
        loss = l1 + (rec - x).pow(2).mean() + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        history.append((step, l1.item(), kl.item()))
        if step % cfg.log_every == 0:
            log.info("vae step %d/%d  l1 %.4f  kl %.0f  lr %.2e  (%.0f s)", step, total, l1.item(), kl.item(),
                     opt.param_groups[0]["lr"], time.time() - start)
    vae.eval()
    return step


def finetune_decoder(vae, images: np.ndarray, latents: torch.Tensor, cfg: ToyModelConfig, deadline: float,
                     gen: torch.Generator, history: list) -> int:
    """Train ``post_quant_conv`` + decoder on (cached unscaled latent, image) pairs: the encoder and so the
    latents the UNet learned stay as they are (as SD's ft-MSE decoder)."""
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    vae.decoder.train()
    dev = _device_of(vae)
    data = torch.from_numpy(images).permute(0, 3, 1, 2)
    start = time.time()
    total, step = 10 ** 9, 0
    while time.time() < deadline and step < total:
        if step == 20:
            rate = (time.time() - start) / 20
            total = int(20 + (deadline - time.time()) / rate)
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, total, cfg.decoder_lr, warmup=20)
        idx = torch.randint(0, len(data), (cfg.decoder_batch,), generator=gen)
        x = data[idx].float() / 127.5 - 1.0
        z = latents[idx]
        if torch.rand((), generator=gen) < 0.5:
            x, z = x.flip(-1), z.flip(-1)
        x, z = x.to(dev), z.to(dev)
        with _autocast(dev, cfg.bf16):
            rec = vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        loss = l1 + (rec - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        history.append((step, l1.item(), 0.0))
        if step % cfg.log_every == 0:
            log.info("decoder step %d/%d  l1 %.4f  (%.0f s)", step, total, l1.item(), time.time() - start)
    vae.eval().requires_grad_(False)
    return step


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means, unscaled, ``(N, 4, h, w)`` float32."""
    out = []
    dev = _device_of(vae)
    for i in range(0, len(images), batch):
        out.append(vae.encode(_to_pixels(images[i:i + batch]).to(dev)).latent_dist.mean.cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = _to_pixels(images[i:i + batch]).to(_device_of(vae))
        out.append(_to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


def vae_report(vae, cfg: ToyModelConfig, n: int = 500) -> dict:
    """PSNR of reconstructions of ``n`` unseen train-split scenes (all patterned), and the pattern detector's
    accuracy on the ground-truth patterned part of the originals and the reconstructions."""
    from .detector import PatternDetector

    scenes = [render_scene(s, size=cfg.size, split="train", pattern_prob=1.0)
              for s in scene_seeds(n, cfg.seed + 1_000_003)]
    orig = np.stack([s.image for s in scenes])
    rec = reconstruct(vae, orig)
    det = PatternDetector.load()
    masks = [s.pattern_mask for s in scenes]
    truth = [s.pattern for s in scenes]
    acc_o = float(np.mean([p == t for p, t in zip(det.predict_batch(list(orig), masks), truth)]))
    acc_r = float(np.mean([p == t for p, t in zip(det.predict_batch(list(rec), masks), truth)]))
    return {"psnr_db": round(psnr(orig, rec), 2), "n": n, "detector_acc_originals": round(acc_o, 4),
            "detector_acc_reconstructions": round(acc_r, 4)}


# ---------------------------------------------------------------------------------------------- diffusion


class _EMA:
    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: Sequence[torch.nn.Module]) -> None:
        params = [p for m in modules for p in m.parameters()]
        for p, s in zip(params, self.shadow):
            p.copy_(s)


def _ema_copy(module, ema: _EMA, offset: int):
    out = copy.deepcopy(module)
    with torch.no_grad():
        for p, s in zip(out.parameters(), ema.shadow[offset:]):
            p.copy_(s)
    return out


def _save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_diffusion(unet, text_encoder, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor,
                    cfg: ToyModelConfig, deadline: float, work: Path, history: list,
                    on_checkpoint=None) -> Tuple[_EMA, int]:
    """Joint UNet + text-encoder training on scaled latents; EMA of both; checkpoints to ``work``."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    dev = _device_of(unet)
    acp = sched.alphas_cumprod.float()
    snr = (acp / (1 - acp)).to(dev)
    latents, input_ids, empty_ids = latents.to(dev), input_ids.to(dev), empty_ids.to(dev)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ema = _EMA([unet, text_encoder], cfg.ema)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    step = 0
    ckpt = work / "diffusion.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")   # our own checkpoint; gen state on CPU
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        for s, v in zip(ema.shadow, state["ema"]):
            s.copy_(v)
        gen.set_state(state["gen"])
        step = state["step"]
        history[:] = state["history"]
        log.info("resumed diffusion training at step %d", step)
    unet.train()
    text_encoder.train()
    n = len(latents)
    last_ckpt = time.time()
    start, start_step = time.time(), step
    while step < cfg.unet_steps and time.time() < deadline:
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * min(1.0, (step + 1) / cfg.warmup)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen).to(dev)
        x0 = latents[idx]
        ids = input_ids[idx].clone()
        drop = (torch.rand(cfg.unet_batch, generator=gen) < cfg.cond_drop).to(dev)
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen).to(dev)
        xt = sched.add_noise(x0, noise, t)
        with _autocast(dev, cfg.bf16):
            cond = text_encoder(ids)[0]
            pred = unet(xt, t, cond).sample.float()
        mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        if cfg.min_snr > 0:
            w = snr[t].clamp(max=cfg.min_snr) / snr[t]
            loss = (w * mse).mean()
        else:
            loss = mse.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        step += 1
        history.append((step, mse.mean().item(), loss.item()))
        if step % cfg.log_every == 0:
            recent = np.mean([h[1] for h in history[-cfg.log_every:]])
            log.info("unet step %d  mse %.4f  (%.2f s/step, %.1f min left)", step, recent,
                     (time.time() - start) / max(1, step - start_step), (deadline - time.time()) / 60)
        if time.time() - last_ckpt > cfg.ckpt_minutes * 60:
            _save_ckpt(ckpt, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                              "opt": opt.state_dict(), "ema": ema.shadow, "gen": gen.get_state(), "step": step,
                              "history": history})
            if on_checkpoint is not None:
                on_checkpoint(ema, step)
            last_ckpt = time.time()
            log.info("checkpoint at step %d", step)
    _save_ckpt(ckpt, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                      "opt": opt.state_dict(), "ema": ema.shadow, "gen": gen.get_state(), "step": step,
                      "history": history})
    unet.eval()
    text_encoder.eval()
    return ema, step


# ------------------------------------------------------------------------------------------------ saving


def save_pipeline(out: Path, vae, text_encoder, unet, dtype: str = "fp16") -> Path:
    """Write a StableDiffusionPipeline folder (safetensors; ``dtype`` weights) atomically-ish."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from clic.builder import build_clip_tokenizer

    sched = PNDMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    mods = [copy.deepcopy(m).cpu() for m in (vae, text_encoder, unet)]
    if dtype == "fp16":
        for m in mods:
            m.to(torch.float16)
    pipe = StableDiffusionPipeline(vae=mods[0], text_encoder=mods[1], tokenizer=build_clip_tokenizer(),
                                   unet=mods[2], scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers (v5) loads a checkpoint in the dtype its config names while diffusers loads fp32 by default:
    # name fp32 so that a stock StableDiffusionPipeline.from_pretrained(folder) gets one dtype throughout
    # (the weights stay fp16 on disk; an explicit torch_dtype still wins)
    te_conf = tmp / "text_encoder" / "config.json"
    conf = json.loads(te_conf.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in conf:
            conf[key] = "float32"
    te_conf.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(backbone, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50, guidance: float = 6.0,
             batch_size: int = 32) -> np.ndarray:
    """DDIM (eta 0) + classifier-free guidance with a :class:`clic.models.Backbone`; one CPU generator per
    image, seeded with its seed. Returns ``(N, R, R, 3)`` uint8."""
    out = []
    uncond = backbone.encode_text(backbone.tokenize([""]))
    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
        sched = backbone.sampling_scheduler("ddim")
        sched.set_timesteps(steps)
        cond = backbone.encode_text(backbone.tokenize(ps))
        ctx = torch.cat([uncond.expand(len(ps), -1, -1), cond]).to(backbone.unet.dtype)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in ss])
        x = x.to(backbone.device) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t).to(backbone.unet.dtype)
            eps = backbone.unet(inp, t, ctx).sample.float()
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        out.append(_to_uint8(backbone.decode(x)))
    return np.concatenate(out)


def _backbone_from_modules(vae, text_encoder, unet):
    from clic.builder import build_clip_tokenizer
    from clic.models import Backbone

    tok = build_clip_tokenizer()
    sc = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    return Backbone("in-memory", tok, text_encoder, vae, unet, sc, torch.device("cpu"), torch.float32,
                    extra={"base_vocab_size": len(tok)})


def sample_grid(backbone, path: Path, prompts: Sequence[str] = GRID_PROMPTS, seeds: Sequence[int] = (0, 1),
                steps: int = 50, guidance: float = 6.0, cols: int = 8, scale: int = 2) -> Path:
    """Images of ``prompts`` x ``seeds`` (seed-major within a prompt) with the prompt written under each."""
    from PIL import Image, ImageDraw

    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    imgs = generate(backbone, ps, ss, steps=steps, guidance=guidance)
    r = imgs.shape[1] * scale
    cell_h = r + 24
    per_row = cols * len(seeds)
    rows = math.ceil(len(imgs) / per_row)
    sheet = Image.new("RGB", (per_row * r, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, im in enumerate(imgs):
        x, y = (k % per_row) * r, (k // per_row) * cell_h
        sheet.paste(Image.fromarray(im).resize((r, r), Image.NEAREST), (x, y))
        if k % len(seeds) == 0:
            words = prompts[k // len(seeds)].split(" with ")
            draw.text((x + 2, y + r + 1), words[0], fill=(0, 0, 0))
            if len(words) > 1:
                draw.text((x + 2, y + r + 12), "w/ " + words[1], fill=(0, 0, 0))
    path = Path(path)
    sheet.save(path)
    return path


def loss_curve(path: Path, vae_hist: list, unet_hist: list, vae_note: str = "") -> Path:
    """Two panels (VAE L1, diffusion MSE), drawn with Pillow (no matplotlib dependency)."""
    from PIL import Image, ImageDraw

    W, H, pad = 520, 300, 40
    sheet = Image.new("RGB", (2 * W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def panel(x0, hist, col, title, log_y):
        if not hist:
            return
        steps = np.array([h[0] for h in hist], dtype=np.float64)
        vals = np.array([h[1] for h in hist], dtype=np.float64)
        k = max(1, len(vals) // 200)
        sm = np.convolve(vals, np.ones(k) / k, mode="valid")
        st = steps[k - 1:]
        y = np.log10(np.clip(sm, 1e-6, None)) if log_y else sm
        lo, hi = float(y.min()), float(y.max())
        hi = hi if hi > lo else lo + 1
        X = x0 + pad + (st - st[0]) / max(1.0, st[-1] - st[0]) * (W - 2 * pad)
        Y = H - pad - (y - lo) / (hi - lo) * (H - 2 * pad)
        draw.rectangle([x0 + pad, pad, x0 + W - pad, H - pad], outline=(0, 0, 0))
        draw.line(list(zip(X.tolist(), Y.tolist())), fill=col, width=2)
        draw.text((x0 + pad, 8), f"{title} (moving average of {k}; {'log10 ' if log_y else ''}y)", fill=(0, 0, 0))
        fmt = (lambda v: f"{10 ** v:.4g}") if log_y else (lambda v: f"{v:.4g}")
        draw.text((x0 + 2, pad - 12), fmt(hi), fill=(0, 0, 0))
        draw.text((x0 + 2, H - pad + 2), fmt(lo), fill=(0, 0, 0))
        draw.text((x0 + W - pad - 60, H - pad + 12), f"step {int(st[-1])}", fill=(0, 0, 0))

    panel(0, vae_hist, (200, 60, 30), "VAE L1" + vae_note, True)
    panel(W, unet_hist, (30, 60, 200), "UNet epsilon MSE", True)
    sheet.save(path)
    return Path(path)


# ------------------------------------------------------------------------------------------------ training


def train_toy_model(out_dir, cfg: Optional[ToyModelConfig] = None, resume: bool = False,
                    command: Optional[str] = None) -> dict:
    """Train the toy model into ``out_dir`` (see the module docstring); returns the ``training.json`` dict.

    ``out_dir/pipeline`` is the diffusers folder; ``out_dir/work`` holds the dataset cache and checkpoints.
    """
    cfg = cfg or ToyModelConfig()
    dev = train_device(cfg.device)
    t_start = time.time()
    deadline = t_start + cfg.max_minutes * 60
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if not resume and (work / "diffusion.pt").exists():
        raise FileExistsError(f"{out}: a training run is there already; pass resume=True (--resume) or a new --out")
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    timings: Dict[str, float] = {}

    # 1. dataset
    t0 = time.time()
    data_file = work / "dataset.npz"
    if data_file.is_file():
        d = np.load(data_file)
        images, captions = d["images"], [str(c) for c in d["captions"]]
    else:
        images, captions = render_dataset(cfg.n_scenes, cfg.seed, cfg.size, workers=cfg.threads)
        np.savez(data_file, images=images, captions=np.array(captions))
    timings["render_s"] = round(time.time() - t0, 1)
    log.info("dataset: %d scenes (%.0f s)", len(images), timings["render_s"])

    # 2. VAE
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    vae_file = work / "vae.pt"
    vae_hist: list = []
    vae.to(dev)
    if vae_file.is_file():
        state = torch.load(vae_file, weights_only=False, map_location=dev)
        vae.load_state_dict(state["vae"])
        vae_hist, vae_steps = state["history"], state["steps"]
    else:
        vae_steps = train_vae(vae, images, cfg, min(deadline, time.time() + cfg.vae_minutes * 60),
                              torch.Generator().manual_seed(cfg.seed + 1), vae_hist)
        _save_ckpt(vae_file, {"vae": vae.state_dict(), "history": vae_hist, "steps": vae_steps})
    vae.eval().requires_grad_(False)
    timings["vae_train_s"] = round(time.time() - t0, 1)
    vae_metrics = vae_report(vae, cfg, n=cfg.vae_eval_n)
    log.info("VAE: %d steps, PSNR %.2f dB, detector on reconstructions %.3f (originals %.3f)", vae_steps,
             vae_metrics["psnr_db"], vae_metrics["detector_acc_reconstructions"], vae_metrics["detector_acc_originals"])

    # 3. latents
    t0 = time.time()
    lat_file = work / "latents.pt"
    if lat_file.is_file():
        latents = torch.load(lat_file)
    else:
        latents = encode_latents(vae, images)
        torch.save(latents, lat_file)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    timings["encode_s"] = round(time.time() - t0, 1)
    log.info("latents %s, scaling factor %.4f (%.0f s)", tuple(latents.shape), scaling, timings["encode_s"])

    # 4. UNet + text encoder
    from clic.builder import build_clip_tokenizer

    tok = build_clip_tokenizer()
    input_ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    torch.manual_seed(cfg.seed + 3)
    unet = build_unet(cfg).to(dev)
    torch.manual_seed(cfg.seed + 4)
    text_encoder = build_text_encoder(cfg).to(dev)
    log.info("parameters: VAE %.2f M, UNet %.2f M, text encoder %.2f M (%.2f M in the token embedding)",
             n_params(vae) / 1e6, n_params(unet) / 1e6, n_params(text_encoder) / 1e6,
             text_encoder.get_input_embeddings().weight.numel() / 1e6)
    n_unet = sum(1 for _ in unet.parameters())

    def export(ema: _EMA, step: int, dest: Path = out / "pipeline") -> Path:
        u, te = _ema_copy(unet, ema, 0), _ema_copy(text_encoder, ema, n_unet)
        return save_pipeline(dest, vae, te, u, cfg.dtype)

    t0 = time.time()
    # kept back for the decoder phase and the sample grid (2.5 minutes on a CPU, seconds on a GPU)
    grid_s = (2.5 * 60 if dev.type == "cpu" else 30) if cfg.n_scenes >= 1000 else 0
    reserve = grid_s + cfg.decoder_minutes * 60
    unet_hist: list = []
    ema, unet_steps = train_diffusion(unet, text_encoder, latents, input_ids, empty_ids, cfg,
                                      min(deadline - reserve, time.time() + cfg.max_minutes * 60), work, unet_hist,
                                      on_checkpoint=export)
    timings["unet_train_s"] = round(time.time() - t0, 1)

    # 5. optional decoder fine-tuning (latents unchanged)
    dec_file = work / "decoder.pt"
    dec_hist: list = []
    dec_steps = 0
    if dec_file.is_file():
        state = torch.load(dec_file, weights_only=False, map_location=dev)
        vae.load_state_dict(state["vae"])
        dec_hist, dec_steps = state["history"], state["steps"]
    elif cfg.decoder_minutes > 0:
        t0 = time.time()
        unscaled = latents / scaling
        dec_steps = finetune_decoder(vae, images, unscaled, cfg, time.time() + cfg.decoder_minutes * 60,
                                     torch.Generator().manual_seed(cfg.seed + 5), dec_hist)
        _save_ckpt(dec_file, {"vae": vae.state_dict(), "history": dec_hist, "steps": dec_steps})
        timings["decoder_finetune_s"] = round(time.time() - t0, 1)
    if dec_steps:
        vae.register_to_config(scaling_factor=scaling)
        vae_metrics = {**vae_report(vae, cfg, n=cfg.vae_eval_n), "encoder_only_steps": vae_steps,
                       "decoder_finetune_steps": dec_steps, "before_decoder_finetune": vae_metrics}
        log.info("VAE after decoder fine-tuning: PSNR %.2f dB, detector on reconstructions %.3f",
                 vae_metrics["psnr_db"], vae_metrics["detector_acc_reconstructions"])

    # 6. outputs
    pipe_dir = export(ema, unet_steps)
    from clic.models import load_backbone

    backbone = load_backbone(str(pipe_dir), device=str(dev), dtype="fp32")
    grid = sample_grid(backbone, out / "samples.png", steps=cfg.grid_steps, guidance=cfg.grid_guidance)
    curve = loss_curve(out / "loss.png", vae_hist + [(h[0] + vae_steps, h[1], h[2]) for h in dec_hist], unet_hist,
                       f", decoder only after {vae_steps}" if dec_hist else "")
    k = max(1, min(200, len(unet_hist) // 5))
    size_mb = sum(f.stat().st_size for f in pipe_dir.rglob("*") if f.is_file()) / 1e6
    report = {
        "command": command or "train_toy_model(...)",
        "config": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "wall_time_min": round((time.time() - t_start) / 60, 2),
        "timings_s": timings,
        "final_vae_l1": round(float(np.mean([h[1] for h in vae_hist[-50:]])), 5) if vae_hist else None,
        "decoder_steps": dec_steps,
        "final_decoder_l1": round(float(np.mean([h[1] for h in dec_hist[-50:]])), 5) if dec_hist else None,
        "final_unet_mse": round(float(np.mean([h[1] for h in unet_hist[-k:]])), 5) if unet_hist else None,
        "final_unet_mse_over_steps": k,
        "vae": vae_metrics,
        "vae_scaling_factor": scaling,
        "parameters": {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)},
        "pipeline_mb": round(size_mb, 2),
        "torch": torch.__version__,
        "threads": cfg.threads,
        "device": _device_name(dev),
        "pipeline": str(pipe_dir),
        "samples": str(grid),
        "loss_curve": str(curve),
    }
    if resume and (out / "training.json").is_file():  # keep what the earlier run(s) of this folder did
        prev = json.loads((out / "training.json").read_text())
        report["previous_runs"] = prev.pop("previous_runs", []) + [
            {k: prev.get(k) for k in ("command", "wall_time_min", "timings_s", "vae_steps", "unet_steps")}]
    (out / "training.json").write_text(json.dumps(report, indent=1))
    shutil.copy(out / "training.json", pipe_dir / "training.json")
    log.info("done in %.1f min: %s", report["wall_time_min"], pipe_dir)
    return report


# ---------------------------------------------------------------------------------------------- evaluation


def _plane_background(img: np.ndarray, border: int = 2) -> np.ndarray:
    """Per-channel least-squares plane through the border pixels: the background (plain or gradient)."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    edge = np.zeros((h, w), dtype=bool)
    edge[:border], edge[-border:], edge[:, :border], edge[:, -border:] = True, True, True, True
    A = np.stack([np.ones(edge.sum()), xx[edge], yy[edge]], 1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(A, img[edge].astype(np.float64), rcond=None)
    full = np.stack([np.ones(h * w), xx.ravel(), yy.ravel()], 1) @ coef
    return full.reshape(h, w, 3)


def foreground_mask(img: np.ndarray, threshold: float = 45.0) -> np.ndarray:
    """Pixels whose RGB distance from the fitted background plane exceeds ``threshold``: the world keeps every
    object colour > 80 away from every background pixel, so this finds the object in renders and samples alike."""
    bg = _plane_background(img)
    return np.linalg.norm(img.astype(np.float64) - bg, axis=-1) > threshold


_PRIOR_GRID = 32


def part_priors(n: int = 150, seed: int = 7, size: int = 64) -> Dict[str, Dict[str, np.ndarray]]:
    """Per class and patternable part: the frequency with which a pixel of the object's bounding box (resampled
    to 32x32) belongs to the part, over ``n`` plain renders."""
    from PIL import Image

    pri: Dict[str, Dict[str, np.ndarray]] = {}
    for ci, cls in enumerate(CLASSES):
        acc = {p: np.zeros((_PRIOR_GRID, _PRIOR_GRID)) for p in PATTERNABLE_PARTS[cls]}
        for s in scene_seeds(n, seed * 100 + ci):
            sc = render_scene(s, size=size, object_class=cls, pattern="none")
            ys, xs = np.nonzero(sc.object_mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            for p in acc:
                m = sc.part_masks[p][y0:y1, x0:x1].astype(np.float32)
                acc[p] += np.asarray(Image.fromarray(m, mode="F").resize((_PRIOR_GRID, _PRIOR_GRID), Image.BILINEAR))
        pri[cls] = {p: a / n for p, a in acc.items()}
    return pri


def part_region(img: np.ndarray, prior: np.ndarray, fg: Optional[np.ndarray] = None,
                threshold: float = 0.5) -> np.ndarray:
    """Where a part should be: ``prior`` stretched over the foreground's bounding box, thresholded, within the
    foreground (falls back to lower thresholds, then to the whole foreground, when that is empty)."""
    from PIL import Image

    fg = foreground_mask(img) if fg is None else fg
    if fg.sum() < 20:
        return fg
    ys, xs = np.nonzero(fg)
    y0, y1 = int(np.percentile(ys, 1)), int(np.percentile(ys, 99)) + 1
    x0, x1 = int(np.percentile(xs, 1)), int(np.percentile(xs, 99)) + 1
    full = np.zeros(fg.shape, dtype=np.float32)
    full[y0:y1, x0:x1] = np.asarray(Image.fromarray(prior.astype(np.float32), mode="F").resize(
        (max(1, x1 - x0), max(1, y1 - y0)), Image.BILINEAR))
    for th in (threshold, 0.35, 0.2):
        region = (full > th) & fg
        if region.sum() >= 12:
            return region
    return fg


def top_colours(img: np.ndarray, mask: np.ndarray, k: int = 2) -> List[str]:
    """The ``k`` named colours (:data:`COLOURS`) nearest to most pixels of ``mask``, most frequent first (fewer if
    fewer occur)."""
    if mask.sum() == 0:
        return []
    names = list(COLOURS)
    ref = np.array([COLOURS[n] for n in names], dtype=np.float64)
    px = img[mask].astype(np.float64)
    near = np.linalg.norm(px[:, None, :] - ref[None], axis=-1).argmin(1)
    counts = np.bincount(near, minlength=len(names))
    return [names[int(i)] for i in np.argsort(-counts, kind="stable")[:k] if counts[i] > 0]


def dominant_colour(img: np.ndarray, mask: np.ndarray) -> Optional[str]:
    """The named colour (:data:`COLOURS`) nearest to most pixels of ``mask``."""
    top = top_colours(img, mask, 1)
    return top[0] if top else None


def eval_prompts(n: int, n_plain: int, seed: int) -> List[dict]:
    """``n`` random training (class, part, pattern) triples with random colours, then ``n_plain`` plain objects."""
    rng = np.random.default_rng(seed)
    triples = [(c, part, pat) for c in CLASSES for pat, part in allowed_pairs(c, "train")]
    colours = list(COLOURS)
    out = []
    for _ in range(n):
        c, part, pat = triples[int(rng.integers(len(triples)))]
        col = colours[int(rng.integers(len(colours)))]
        adj = PATTERN_ADJECTIVES[pat]
        art = "an" if col[0] in "aeiou" else "a"
        phrase = f"{adj} {part}" if part.endswith("s") else f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {part}"
        out.append({"prompt": f"{art} {col} {c} with {phrase}", "class": c, "part": part, "pattern": pat,
                    "colour": col})
    for _ in range(n_plain):
        c = list(CLASSES)[int(rng.integers(len(CLASSES)))]
        col = colours[int(rng.integers(len(colours)))]
        art = "an" if col[0] in "aeiou" else "a"
        out.append({"prompt": f"{art} {col} {c}", "class": c, "part": None, "pattern": None, "colour": col})
    return out


def score_images(images: Sequence[np.ndarray], items: Sequence[dict], det, priors) -> List[dict]:
    """Per image: foreground fraction, pattern label on the prompted part's expected region (patterned prompts)
    or on the region of every part patterned in training (plain prompts), and the dominant named colour."""
    rows = []
    regions, owners = [], []
    for k, (img, it) in enumerate(zip(images, items)):
        fg = foreground_mask(img)
        row = {"fg_frac": float(fg.mean()), "colour_pred": dominant_colour(img, fg)}
        # plain prompts: every part that carries patterns in training (held-out combinations, e.g. house doors,
        # are never patterned there)
        parts = [it["part"]] if it["part"] else [p for p in PATTERNABLE_PARTS[it["class"]]
                                                 if (it["class"], p) not in HELD_OUT_COMBOS]
        for p in parts:
            r = part_region(img, priors[it["class"]][p], fg)
            if r.sum() == 0:
                r = np.ones_like(fg)
            regions.append((img, r))
            owners.append((k, p))
        rows.append(row)
    labels = det.predict_batch([r[0] for r in regions], [r[1] for r in regions]) if regions else []
    for (k, p), lab in zip(owners, labels):
        rows[k].setdefault("labels", {})[p] = lab
    for row, it in zip(rows, items):
        labs = row.get("labels", {})
        if it["pattern"]:
            row["pattern_ok"] = labs.get(it["part"]) == it["pattern"]
        else:
            row["plain_ok"] = all(v == "none" for v in labs.values())
        row["colour_ok"] = row["colour_pred"] == it["colour"]
    return rows


def _summarise(rows: List[dict], items: List[dict]) -> dict:
    pat = [r["pattern_ok"] for r, it in zip(rows, items) if it["pattern"]]
    plain = [r["plain_ok"] for r, it in zip(rows, items) if not it["pattern"]]
    per_pattern = {}
    for p in TRAIN_PATTERNS:
        v = [r["pattern_ok"] for r, it in zip(rows, items) if it["pattern"] == p]
        if v:
            per_pattern[p] = round(float(np.mean(v)), 3)
    fg = np.array([r["fg_frac"] for r in rows])
    return {
        "pattern_accuracy": round(float(np.mean(pat)), 4) if pat else None, "n_patterned": len(pat),
        "plain_accuracy": round(float(np.mean(plain)), 4) if plain else None, "n_plain": len(plain),
        "colour_accuracy": round(float(np.mean([r["colour_ok"] for r in rows])), 4),
        "per_pattern": per_pattern,
        "foreground_fraction": {"mean": round(float(fg.mean()), 3), "min": round(float(fg.min()), 3),
                                "max": round(float(fg.max()), 3)},
    }


def evaluate_toy_model(model_dir, n: int = 60, n_plain: int = 12, seeds_per_prompt: int = 2, steps: int = 50,
                       guidance: float = 6.0, seed: int = 0, out: Optional[str] = None) -> dict:
    """Generate ``seeds_per_prompt`` images for each of ``n`` patterned and ``n_plain`` plain training prompts
    (:func:`eval_prompts`) and score them with the shipped pattern detector (:func:`score_images`). The same
    scoring on real renders of the same prompts (unseen seeds) is reported as the metric's ceiling."""
    from clic.models import load_backbone
    from .detector import PatternDetector

    t0 = time.time()
    backbone = load_backbone(str(model_dir), device="cpu", dtype="fp32")
    det = PatternDetector.load()
    priors = part_priors()
    items = eval_prompts(n, n_plain, seed)
    items_x = [it for it in items for _ in range(seeds_per_prompt)]
    seeds = [1000 * seed + j for it in items for j in range(seeds_per_prompt)]
    images = generate(backbone, [it["prompt"] for it in items_x], seeds, steps=steps, guidance=guidance)
    rows = score_images(images, items_x, det, priors)
    gen_summary = _summarise(rows, items_x)
    # ceiling: real renders of the same prompts
    real = []
    for k, it in enumerate(items_x):
        kw = dict(object_class=it["class"], colour=it["colour"], split="train")
        kw.update(pattern=it["pattern"], part=it["part"]) if it["pattern"] else kw.update(pattern="none")
        real.append(render_scene(10_000_000 + 7919 * k + seed, **kw).image)
    real_summary = _summarise(score_images(real, items_x, det, priors), items_x)
    report = {"model": str(model_dir), "steps": steps, "guidance": guidance, "scheduler": "ddim", "seed": seed,
              "n_images": len(items_x), "generated": gen_summary, "real_renders": real_summary,
              "seconds": round(time.time() - t0, 1)}
    if out:
        from PIL import Image

        outp = Path(out)
        outp.mkdir(parents=True, exist_ok=True)
        (outp / "eval.json").write_text(json.dumps(report, indent=1))
        with open(outp / "eval_rows.jsonl", "w") as f:
            for it, r in zip(items_x, rows):
                f.write(json.dumps({**it, **r}) + "\n")
        # sheet: generated (top of each pair) and the detector's verdict as a coloured bar
        cells = []
        for img, r in zip(images, rows):
            ok = r.get("pattern_ok", r.get("plain_ok"))
            bar = np.zeros((4, img.shape[1], 3), np.uint8)
            bar[:] = (40, 200, 40) if ok else (220, 40, 40)
            cells.append(np.concatenate([img, bar]))
        cols = 12
        while len(cells) % cols:
            cells.append(np.full_like(cells[0], 255))
        rows_img = [np.concatenate(cells[i:i + cols], 1) for i in range(0, len(cells), cols)]
        Image.fromarray(np.concatenate(rows_img)).resize(
            (cols * 64 * 2, len(rows_img) * 68 * 2), Image.NEAREST).save(outp / "eval_sheet.png")
    return report


# ------------------------------------------------------------------------------------------------------ CLI


def _add_config_options(ap: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ToyModelConfig):
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help texts: a literal "%" (e.g. "10%") must be doubled
        text = (f.metadata["help"] + f" (default: {f.default})").replace("%", "%%")
        if isinstance(f.default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(f.default, tuple):
            ap.add_argument(flag, type=int, nargs="+", default=None, help=text)
        else:
            ap.add_argument(flag, type=type(f.default), default=None, help=text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clic_lab.toyworld.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (pipeline/, samples.png, loss.png, training.json, work/)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out (reuses dataset, VAE, checkpoints)")
    ap.add_argument("--evaluate", metavar="MODEL_DIR", help="measure a trained pipeline folder instead of training")
    ap.add_argument("--n-eval", type=int, default=60, help="--evaluate: patterned prompts")
    ap.add_argument("--n-plain", type=int, default=12, help="--evaluate: plain prompts")
    ap.add_argument("--seeds-per-prompt", type=int, default=2, help="--evaluate: images per prompt")
    ap.add_argument("--sample-steps", type=int, default=50, help="--evaluate: DDIM steps")
    ap.add_argument("--guidance", type=float, default=6.0, help="--evaluate: CFG scale")
    ap.add_argument("--eval-out", default=None, help="--evaluate: folder for eval.json, per-image rows and a sheet")
    _add_config_options(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if a.evaluate:
        torch.set_num_threads(a.threads or 1)
        rep = evaluate_toy_model(a.evaluate, n=a.n_eval, n_plain=a.n_plain, seeds_per_prompt=a.seeds_per_prompt,
                                 steps=a.sample_steps, guidance=a.guidance, seed=a.seed or 0, out=a.eval_out)
        print(json.dumps(rep, indent=1))
        return 0
    if not a.out:
        ap.error("--out is required (or --evaluate MODEL_DIR)")
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(ToyModelConfig) if getattr(a, f.name) is not None}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    cfg = ToyModelConfig(**values)
    command = "python -m clic_lab.toyworld.train " + " ".join(sys.argv[1:] if argv is None else list(argv))
    from clic.errors import ClicError

    try:
        rep = train_toy_model(a.out, cfg, resume=a.resume, command=command)
    except ClicError as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: rep[k] for k in ("wall_time_min", "vae_steps", "unet_steps", "final_unet_mse", "vae",
                                          "pipeline", "samples")}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
