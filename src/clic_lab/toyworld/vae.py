"""The toy model's VAE: an AutoencoderKL trained on random crops, an optional decoder-only fine-tuning, and the
report that says whether patterns survive it (the pattern detector on reconstructions)."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import numpy as np
import torch

from .config import ToyModelConfig
from .data import autocast, device_of, psnr, read_threads_file, to_pixels, to_uint8
from .world import render_scene, scene_seeds

log = logging.getLogger("clic_lab.toyworld.train")

__all__ = ["build_vae", "train_vae", "finetune_decoder", "encode_latents", "reconstruct", "vae_report", "cosine_lr"]


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


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train_vae(vae, images: np.ndarray, cfg: ToyModelConfig, deadline: float, gen: torch.Generator,
              history: list, lr: float | None = None, warmup: int = 100) -> int:
    """L1 + MSE + KL on random crops (and flips); stops at ``cfg.vae_steps`` or ``deadline`` (time.time()).
    ``lr`` (default ``cfg.vae_lr``) decays on a cosine to 10% over the steps or the time, whichever ends first;
    ``history`` gets ``(step, l1, kl)`` rows, numbered after the rows it already holds (a continued run)."""
    lr = cfg.vae_lr if lr is None else lr
    offset = history[-1][0] if history else 0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    dev = device_of(vae)
    data = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 view
    c = cfg.vae_crop
    start = time.time()
    budget = max(1e-6, deadline - start)
    step = 0
    while step < cfg.vae_steps and time.time() < deadline:
        # cosine over the step cap or the time budget, whichever ends first (the step rate of a CPU shared with
        # other jobs varies, so the schedule follows the clock)
        frac = min(1.0, max(step / cfg.vae_steps, (time.time() - start) / budget))
        rate = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = rate * min(1.0, (step + 1) / warmup)
        idx = torch.randint(0, len(data), (cfg.vae_batch,), generator=gen)
        x = data[idx].float() / 127.5 - 1.0
        if c < cfg.size:
            i, j = torch.randint(0, cfg.size - c + 1, (2,), generator=gen).tolist()
            x = x[:, :, i:i + c, j:j + c]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        x = x.to(dev)
        with autocast(dev, cfg.bf16):
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
        history.append((offset + step, l1.item(), kl.item()))
        if step % cfg.log_every == 0:
            read_threads_file(cfg.threads_file)
            log.info("vae step %d  l1 %.4f  kl %.0f  lr %.2e  (%.0f s)", offset + step, l1.item(), kl.item(),
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
    dev = device_of(vae)
    data = torch.from_numpy(images[:len(latents)]).permute(0, 3, 1, 2)     # a run may encode the dataset's head only
    factor = cfg.size // latents.shape[-1]
    lc = min(latents.shape[-1], max(1, cfg.decoder_crop // factor)) if cfg.decoder_crop else latents.shape[-1]
    start = time.time()
    budget = max(1e-6, deadline - start)
    step = 0
    while time.time() < deadline:
        frac = min(1.0, (time.time() - start) / budget)      # cosine over the clock (a shared CPU's pace varies)
        for g in opt.param_groups:
            g["lr"] = cfg.decoder_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac))) * min(1.0, (step + 1) / 20)
        idx = torch.randint(0, len(data), (cfg.decoder_batch,), generator=gen)
        x = data[idx].float() / 127.5 - 1.0
        z = latents[idx]
        if lc < latents.shape[-1]:      # a random latent window and the pixels it decodes to
            i, j = torch.randint(0, latents.shape[-1] - lc + 1, (2,), generator=gen).tolist()
            z = z[:, :, i:i + lc, j:j + lc]
            x = x[:, :, i * factor:(i + lc) * factor, j * factor:(j + lc) * factor]
        if torch.rand((), generator=gen) < 0.5:
            x, z = x.flip(-1), z.flip(-1)
        x, z = x.to(dev), z.to(dev)
        with autocast(dev, cfg.bf16):
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
            read_threads_file(cfg.threads_file)
            log.info("decoder step %d  l1 %.4f  lr %.2e  (%.0f s)", step, l1.item(), opt.param_groups[0]["lr"],
                     time.time() - start)
    vae.eval().requires_grad_(False)
    return step


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means, unscaled, ``(N, 4, h, w)`` float32."""
    out = []
    dev = device_of(vae)
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_pixels(images[i:i + batch]).to(dev)).latent_dist.mean.cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = to_pixels(images[i:i + batch]).to(device_of(vae))
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


def vae_report(vae, cfg: ToyModelConfig, n: int = 500, split: str = "train", per_pattern: bool = False) -> dict:
    """PSNR of reconstructions of ``n`` unseen scenes of ``split`` (all patterned), and the pattern detector's
    accuracy on the ground-truth patterned part of the originals and the reconstructions; with ``per_pattern``,
    the same per pattern with 95% Wilson intervals (the goal: every pattern survives the VAE)."""
    from ..stats import wilson_interval
    from .detector import PatternDetector

    scenes = [render_scene(s, size=cfg.size, split=split, pattern_prob=1.0)
              for s in scene_seeds(n, cfg.seed + 1_000_003)]
    orig = np.stack([s.image for s in scenes])
    rec = reconstruct(vae, orig)
    det = PatternDetector.load(cfg.detector or None)
    masks = [s.pattern_mask for s in scenes]
    truth = [s.pattern for s in scenes]
    hit_o = [p == t for p, t in zip(det.predict_batch(list(orig), masks), truth)]
    read_r = det.predict_batch(list(rec), masks)
    hit_r = [p == t for p, t in zip(read_r, truth)]
    out = {"psnr_db": round(psnr(orig, rec), 2), "n": n, "split": split,
           "detector_acc_originals": round(float(np.mean(hit_o)), 4),
           "detector_acc_reconstructions": round(float(np.mean(hit_r)), 4)}
    if per_pattern:
        rows = {}
        for pat in sorted(set(truth)):
            idx = [i for i, t in enumerate(truth) if t == pat]
            k_o, k_r = sum(hit_o[i] for i in idx), sum(hit_r[i] for i in idx)
            lo, hi = wilson_interval(k_r, len(idx))
            wrong = Counter(read_r[i] for i in idx if not hit_r[i])
            rows[pat] = {"n": len(idx), "originals": round(k_o / len(idx), 4),
                         "reconstructions": round(k_r / len(idx), 4), "ci95": [round(lo, 4), round(hi, 4)],
                         "misread_as": dict(wrong.most_common())}
        out["per_pattern"] = rows
    return out
