"""The toy world's inpainting model (RealFill's base): the trained toy text-to-image model in the SD inpainting
layout, fine-tuned to fill masked regions.

RealFill fine-tunes an *inpainting* model (SD2-inpainting in the paper); the toy world has none, so this makes one
the way Stable Diffusion's inpainting checkpoints were made from their text-to-image parents: widen the UNet's
first convolution from 4 to 9 input channels (``[x_t, mask, E(masked image)]``), the new 5 channels zero-initialised
(so at step 0 it is exactly the text-to-image model), then train the UNet with the usual epsilon loss on toy-world
renders under RealFill's random rectangle masks (:func:`clic.baselines.realfill.random_masks`), the text encoder
and VAE frozen and shared with the parent. Seeded; writes a ``StableDiffusionInpaintPipeline`` folder (fp16
safetensors), ``inpaint_training.json`` (command, steps, loss at start and end, in-mask PSNR of 16 held-out
inpaintings before and after) and a sheet ``samples.png`` (rows: masked input, parent, fine-tuned, truth)::

    python -m clic_lab.toyworld.inpaint --model src/clic/assets/toymodel --out runs/toyinpaint --minutes 20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("clic_lab.toyworld.inpaint")


def widen_unet(unet):
    """A copy of a 4-channel text-to-image UNet with a 9-channel input: the extra mask and masked-latent channels
    start at zero weight, so the widened UNet predicts exactly what the original does."""
    from diffusers import UNet2DConditionModel

    c = unet.config.in_channels
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": 2 * c + 1})
    state = {k: v.float() for k, v in unet.state_dict().items()}
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], c + 1, *w.shape[2:])], dim=1)
    wide.load_state_dict(state)
    return wide


@torch.no_grad()
def _encode(backbone, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents (posterior means) of ``pixels`` in [-1, 1]."""
    return backbone.vae.encode(pixels).latent_dist.mean * backbone.vae.config.scaling_factor


def _conditioning(backbone, pixels: torch.Tensor, masks: torch.Tensor, hw) -> tuple[torch.Tensor, torch.Tensor]:
    """The inpainting conditioning: the mask at latent size and the latent of ``pixels * (mask < 0.5)``."""
    import torch.nn.functional as F

    return F.interpolate(masks, size=hw), _encode(backbone, pixels * (masks < 0.5))


@torch.no_grad()
def inpaint_batch(backbone, unet, pixels, masks, prompts, steps: int = 30, guidance: float = 4.0, seed: int = 0):
    """DDIM inpainting of ``masks`` (1 = fill) in ``pixels`` (``(N, 3, R, R)`` in [-1, 1]) with a 9-channel ``unet``
    (a 4-channel one gets plain text-to-image sampling with the known region blended back each step, which is
    the parent model's best effort). Returns uint8 ``(N, R, R, 3)``."""
    from clic.baselines.realfill import inpainting_input

    from .data import to_uint8

    dev = backbone.device
    pixels, masks = pixels.to(dev), masks.to(dev)
    x0 = _encode(backbone, pixels)
    mask_lat, masked = _conditioning(backbone, pixels, masks, x0.shape[-2:])
    sched = backbone.sampling_scheduler("ddim")
    sched.set_timesteps(steps)
    text = backbone.encode_text(backbone.tokenize(list(prompts))).hidden
    uncond = backbone.encode_text(backbone.tokenize([""] * len(prompts))).hidden
    ctx = torch.cat([uncond, text])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x0.shape, generator=gen).to(dev) * sched.init_noise_sigma
    wide = unet.config.in_channels > x0.shape[1]
    for t in sched.timesteps:
        if not wide:  # blended sampling for the parent: the known region follows the noised original
            known = sched.add_noise(x0, torch.randn(x0.shape, generator=gen).to(dev), t.reshape(1))
            x = mask_lat * x + (1 - mask_lat) * known
        inp = torch.cat([x, x])
        if wide:
            inp = inpainting_input(inp, mask_lat.repeat(2, 1, 1, 1), masked.repeat(2, 1, 1, 1))
        eps_u, eps_c = unet(inp, t, ctx).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    if not wide:
        x = mask_lat * x + (1 - mask_lat) * x0
    return to_uint8(backbone.decode(x))


def _masked_psnr(a: np.ndarray, b: np.ndarray, masks: np.ndarray) -> float:
    d = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(-1)
    mse = np.array([d[k][masks[k]].mean() if masks[k].any() else 0.0 for k in range(len(a))]).clip(1e-10)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))


def train_inpainting(model_dir, out_dir, minutes: float = 20.0, max_steps: int = 100_000, n_scenes: int = 5000,
                     batch: int = 32, lr: float = 2e-4, warmup: int = 100, cond_drop: float = 0.1,
                     min_snr: float = 5.0, seed: int = 0, threads: int = 1, command: str | None = None,
                     device: str = "cpu", n_held: int = 16, held_steps: int = 30) -> dict:
    """Fine-tune the widened UNet of ``model_dir`` for ``minutes`` (or ``max_steps``) and write the inpainting
    pipeline to ``out_dir/pipeline``; returns the report written to ``out_dir/inpaint_training.json``. The in-mask
    PSNR of the report is measured on ``n_held`` unseen scenes inpainted in ``held_steps`` DDIM steps, by the
    parent (blended sampling) and by the tuned model."""
    from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline

    from clic.baselines.realfill import inpainting_input, random_masks
    from clic.imaging import save_png
    from clic.models import load_backbone
    from .data import render_dataset, to_pixels, to_uint8, train_device
    from .diffusion import SCHEDULER_CONFIG

    dev = train_device(device)          # the networks there; data and random draws on the CPU
    torch.set_num_threads(threads)
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(str(model_dir), device=str(dev), dtype="fp32")
    size = backbone.resolution
    images, captions = render_dataset(n_scenes, seed + 11, size, workers=threads)
    held_images, held_captions = render_dataset(n_held, seed + 12, size)
    gen = torch.Generator().manual_seed(seed)
    held_masks = random_masks(n_held, size, torch.Generator().manual_seed(seed + 13), full_p=0.0)
    held_pixels = to_pixels(held_images)
    parent = inpaint_batch(backbone, backbone.unet, held_pixels, held_masks, held_captions, steps=held_steps, seed=seed)

    unet = widen_unet(backbone.unet).train()
    # constant inputs once: the clean latents and the caption embeddings (VAE and text encoder are frozen); only
    # the masked-image latent changes with each step's random masks
    latents = torch.cat([_encode(backbone, to_pixels(images[k:k + 256]).to(dev))
                         for k in range(0, len(images), 256)])
    with torch.no_grad():
        texts = torch.cat([backbone.encode_text(backbone.tokenize(captions[k:k + 256])).hidden
                           for k in range(0, len(captions), 256)])
        empty_text = backbone.encode_text(backbone.tokenize([""])).hidden[0]
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    acp = sched.alphas_cumprod.float()
    snr = (acp / (1 - acp)).to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    history: list[tuple[int, float]] = []
    deadline = t_start + minutes * 60
    step = 0
    while step < max_steps and time.time() < deadline:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        masks = random_masks(batch, size, gen).to(dev)
        x0 = latents[idx.to(dev)]
        mask_lat, masked = _conditioning(backbone, to_pixels(images[idx.numpy()]).to(dev), masks, x0.shape[-2:])
        text = texts[idx.to(dev)].clone()
        text[(torch.rand(batch, generator=gen) < cond_drop).to(dev)] = empty_text
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(dev)
        pred = unet(inpainting_input(sched.add_noise(x0, noise, t), mask_lat, masked), t, text).sample
        mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (snr[t].clamp(max=min_snr) / snr[t] * mse).mean() if min_snr > 0 else mse.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        history.append((step, mse.mean().item()))
        if step % 50 == 0:
            log.info("inpaint step %d  mse %.4f  (%.1f min left)", step, np.mean([h[1] for h in history[-50:]]),
                     (deadline - time.time()) / 60)
    unet.eval().requires_grad_(False)
    tuned = inpaint_batch(backbone, unet, held_pixels, held_masks, held_captions, steps=held_steps, seed=seed)

    # outputs: the pipeline (fp16, the parent's text encoder, VAE and tokenizer), a sheet and the report
    sc = PNDMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    pipe = StableDiffusionInpaintPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder,
                                          tokenizer=backbone.tokenizer, unet=unet, scheduler=sc, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False).to("cpu", torch.float16)
    pipe_dir = out / "pipeline"
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    m = held_masks[:, 0].cpu().numpy() > 0.5
    shown = to_uint8(held_pixels * (held_masks < 0.5))
    sheet = np.concatenate([np.concatenate(list(row), axis=1) for row in (shown, parent, tuned, held_images)], axis=0)
    from PIL import Image

    save_png(Image.fromarray(sheet), out / "samples.png")
    k = max(1, min(100, len(history) // 5))
    report = {
        "command": command or "train_inpainting(...)", "parent": str(model_dir), "seed": seed, "steps": step,
        "batch": batch, "lr": lr, "n_scenes": n_scenes, "threads": threads,
        "wall_time_min": round((time.time() - t_start) / 60, 2),
        "mse_first": round(float(np.mean([h[1] for h in history[:k]])), 5) if history else None,
        "mse_last": round(float(np.mean([h[1] for h in history[-k:]])), 5) if history else None,
        "held_out_in_mask_psnr_db": {"parent_blended": round(_masked_psnr(parent, held_images, m), 2),
                                     "inpainting": round(_masked_psnr(tuned, held_images, m), 2)},
        "pipeline": str(pipe_dir), "samples": str(out / "samples.png"),
    }
    (out / "inpaint_training.json").write_text(json.dumps(report, indent=1))
    (pipe_dir / "inpaint_training.json").write_text(json.dumps(report, indent=1))
    log.info("done: %s", json.dumps(report["held_out_in_mask_psnr_db"]))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clic_lab.toyworld.inpaint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="the text-to-image parent (default: the bundled toy model)")
    ap.add_argument("--out", required=True, help="output folder (pipeline/, samples.png, inpaint_training.json)")
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--scenes", type=int, default=5000, help="training renders")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads, and processes rendering the data")
    ap.add_argument("--device", default="cpu", help="where the UNet trains: cpu or cuda")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model = a.model
    if model is None:
        from clic.models import bundled_model

        model = str(bundled_model())
    command = "python -m clic_lab.toyworld.inpaint " + " ".join(sys.argv[1:] if argv is None else list(argv))
    from clic.errors import ClicError

    try:
        rep = train_inpainting(model, a.out, a.minutes, a.max_steps, a.scenes, a.batch, a.lr, seed=a.seed,
                               threads=a.threads, command=command, device=a.device)
    except ClicError as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
