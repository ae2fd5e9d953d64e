"""The toy model's text encoder and UNet: built in SD's layout, trained jointly on the cached latents
(epsilon prediction, min-SNR weighting, caption dropout for guidance, EMA), written as a diffusers
``StableDiffusionPipeline`` folder, and sampled (DDIM + classifier-free guidance) for grids and evaluation."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from .config import ToyModelConfig
from .data import autocast, device_of, read_threads_file, to_uint8

log = logging.getLogger("clic_lab.toyworld.train")

__all__ = ["SCHEDULER_CONFIG", "GRID_PROMPTS", "build_text_encoder", "build_unet", "n_params", "EMA", "ema_copy",
           "save_checkpoint", "train_diffusion", "load_diffusion_weights", "save_pipeline", "generate", "sample_grid"]


SCHEDULER_CONFIG = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    prediction_type="epsilon", trained_betas=None, timestep_spacing="leading",
)

#: Prompts of the sample grid: every class plain and with training patterns on its training parts.
GRID_PROMPTS: List[str] = [
    "a red chair", "a blue chair with a striped back", "a yellow chair with a dotted back", "a green chair with a starry back",
    "a white house", "a blue house with checkered walls", "a brown house with a ringed roof", "a yellow house with zigzag walls",
    "a teal vase", "an orange vase with a wavy body", "a purple vase with a crossed body", "a black vase with a diamond body",
    "a pink lamp", "a green lamp with a striped shade", "a red lamp with a triangle shade", "a blue lamp with a dotted shade",
    "a gray table", "a brown table with a checkered top", "an orange table with a starry top", "a teal table with a wavy top",
    "a yellow mug", "a red mug with a ringed body", "a blue mug with a zigzag body", "a green mug with a diamond body",
]


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
        down_block_types=("DownBlock2D",) * (n - cfg.unet_cross_levels) + ("CrossAttnDownBlock2D",) * cfg.unet_cross_levels,
        up_block_types=("CrossAttnUpBlock2D",) * cfg.unet_cross_levels + ("UpBlock2D",) * (n - cfg.unet_cross_levels),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads, norm_num_groups=cfg.unet_norm_groups,
    )


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class EMA:
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


def ema_copy(module, ema: EMA, offset: int):
    out = copy.deepcopy(module)
    with torch.no_grad():
        for p, s in zip(out.parameters(), ema.shadow[offset:]):
            p.copy_(s)
    return out


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_diffusion(unet, text_encoder, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor,
                    cfg: ToyModelConfig, deadline: float, work: Path, history: list,
                    on_checkpoint=None) -> Tuple[EMA, int]:
    """Joint UNet + text-encoder training on scaled latents; EMA of both; checkpoints to ``work``."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    dev = device_of(unet)
    acp = sched.alphas_cumprod.float()
    snr = (acp / (1 - acp)).to(dev)
    latents, input_ids, empty_ids = latents.to(dev), input_ids.to(dev), empty_ids.to(dev)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ema = EMA([unet, text_encoder], cfg.ema)
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
    elif cfg.init_diffusion:
        step = load_diffusion_weights(unet, text_encoder, cfg.init_diffusion)
        for s, p in zip(ema.shadow, ema.params):
            s.copy_(p.detach())
        log.info("diffusion weights from %s (step %d); fresh optimiser", cfg.init_diffusion, step)
    warm_from = 0 if ckpt.is_file() or not cfg.init_diffusion else step
    unet.train()
    text_encoder.train()
    n = len(latents)
    last_ckpt = time.time()
    start, start_step = time.time(), step
    while step < cfg.unet_steps and time.time() < deadline:
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * min(1.0, (step - warm_from + 1) / cfg.warmup)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen).to(dev)
        x0 = latents[idx]
        ids = input_ids[idx].clone()
        drop = (torch.rand(cfg.unet_batch, generator=gen) < cfg.cond_drop).to(dev)
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen).to(dev)
        xt = sched.add_noise(x0, noise, t)
        with autocast(dev, cfg.bf16):
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
            read_threads_file(cfg.threads_file)
            recent = np.mean([h[1] for h in history[-cfg.log_every:]])
            log.info("unet step %d  mse %.4f  (%.2f s/step, %.1f min left)", step, recent,
                     (time.time() - start) / max(1, step - start_step), (deadline - time.time()) / 60)
        if time.time() - last_ckpt > cfg.ckpt_minutes * 60:
            save_checkpoint(ckpt, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                              "opt": opt.state_dict(), "ema": ema.shadow, "gen": gen.get_state(), "step": step,
                              "history": history})
            if on_checkpoint is not None:
                on_checkpoint(ema, step)
            last_ckpt = time.time()
            log.info("checkpoint at step %d", step)
    save_checkpoint(ckpt, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                      "opt": opt.state_dict(), "ema": ema.shadow, "gen": gen.get_state(), "step": step,
                      "history": history})
    unet.eval()
    text_encoder.eval()
    return ema, step


def load_diffusion_weights(unet, text_encoder, folder) -> int:
    """Load the UNet and text encoder of a pipeline folder written by :func:`save_pipeline` (any dtype on disk) into
    ``unet`` / ``text_encoder`` (same architecture); returns the UNet steps its ``training.json`` records (0 when
    it has none). Only safetensors are read."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for module, sub in ((unet, "unet"), (text_encoder, "text_encoder")):
        files = sorted((folder / sub).glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{folder / sub}: expected one .safetensors file, found {len(files)}")
        state = load_file(str(files[0]))
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or shapes:
            raise ValueError(f"{files[0]}: not this architecture (missing {missing[:3]}, other shapes {shapes[:3]})")
        module.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=False)
    meta = folder / "training.json"
    return int(json.loads(meta.read_text()).get("unet_steps", 0)) if meta.is_file() else 0


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
    uncond = backbone.encode_text(backbone.tokenize([""])).hidden      # SD layout: the hidden states
    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
        sched = backbone.sampling_scheduler("ddim")
        sched.set_timesteps(steps)
        cond = backbone.encode_text(backbone.tokenize(ps)).hidden
        ctx = torch.cat([uncond.expand(len(ps), -1, -1), cond]).to(backbone.unet.dtype)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in ss])
        x = x.to(backbone.device) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t).to(backbone.unet.dtype)
            eps = backbone.unet(inp, t, ctx).sample.float()
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        out.append(to_uint8(backbone.decode(x)))
    return np.concatenate(out)


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
