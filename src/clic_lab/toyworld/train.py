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
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .config import ToyModelConfig
from .data import device_name, render_dataset, train_device
from .diffusion import (EMA, build_text_encoder, build_unet, ema_copy, n_params, sample_grid, save_checkpoint,
                        save_pipeline, train_diffusion)
from .evaluate import evaluate_toy_model
from .vae import build_vae, encode_latents, finetune_decoder, train_vae, vae_report

log = logging.getLogger("clic_lab.toyworld.train")

__all__ = ["train_toy_model", "loss_curve", "main"]


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
        if len(images) > cfg.n_scenes:          # a run that asks for fewer scenes than the cache holds: its head
            images, captions = images[:cfg.n_scenes], captions[:cfg.n_scenes]
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
        if cfg.vae_more_minutes > 0 and not (work / "latents.pt").is_file():
            vae_steps += train_vae(vae, images, cfg, min(deadline, time.time() + cfg.vae_more_minutes * 60),
                                   torch.Generator().manual_seed(cfg.seed + 1 + vae_steps), vae_hist,
                                   lr=cfg.vae_lr / 2, warmup=20)
            save_checkpoint(vae_file, {"vae": vae.state_dict(), "history": vae_hist, "steps": vae_steps})
    elif cfg.init_vae:
        vae_steps = load_vae_weights(vae, cfg.init_vae)
        save_checkpoint(vae_file, {"vae": vae.state_dict(), "history": vae_hist, "steps": vae_steps})
    else:
        vae_steps = train_vae(vae, images, cfg, min(deadline, time.time() + cfg.vae_minutes * 60),
                              torch.Generator().manual_seed(cfg.seed + 1), vae_hist)
        save_checkpoint(vae_file, {"vae": vae.state_dict(), "history": vae_hist, "steps": vae_steps})
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

    def export(ema: EMA, step: int, dest: Path = out / "pipeline") -> Path:
        u, te = ema_copy(unet, ema, 0), ema_copy(text_encoder, ema, n_unet)
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
        save_checkpoint(dec_file, {"vae": vae.state_dict(), "history": dec_hist, "steps": dec_steps})
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
        "device": device_name(dev),
        "pipeline": str(pipe_dir),
        "samples": str(grid),
        "loss_curve": str(curve),
    }
    earlier = out / "training.json"
    if not (resume and earlier.is_file()) and cfg.init_diffusion:       # the sittings of the model it continues
        earlier = Path(cfg.init_diffusion) / "training.json"
    if (resume or cfg.init_diffusion) and earlier.is_file():  # keep what the earlier run(s) did
        prev = json.loads(earlier.read_text())
        report["previous_runs"] = prev.pop("previous_runs", []) + [
            {k: prev.get(k) for k in ("command", "wall_time_min", "timings_s", "vae_steps", "unet_steps")}]
    (out / "training.json").write_text(json.dumps(report, indent=1))
    shutil.copy(out / "training.json", pipe_dir / "training.json")
    log.info("done in %.1f min: %s", report["wall_time_min"], pipe_dir)
    return report


# ------------------------------------------------------------------------------------------------------ CLI


def _add_config_options(ap: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ToyModelConfig):
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help texts: a literal "%" (e.g. "10%") must be doubled
        text = (f.metadata["help"] + f" (default: {f.default})").replace("%", "%%")
        if isinstance(f.default, bool) or "bool" in str(f.type):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(f.default, tuple):
            ap.add_argument(flag, type=int, nargs="+", default=None, help=text)
        else:
            ap.add_argument(flag, type=type(f.default), default=None, help=text)


def save_vae_weights(run_dir, dest) -> Path:
    """The VAE of a run (``run_dir/work/vae.pt``, or its fine-tuned decoder ``decoder.pt`` when there is one) as a
    safetensors file with its step count, for ``--init-vae`` (a run elsewhere can skip the VAE phase)."""
    from safetensors.torch import save_file

    work = Path(run_dir) / "work"
    src = work / "decoder.pt" if (work / "decoder.pt").is_file() else work / "vae.pt"
    state = torch.load(src, weights_only=False, map_location="cpu")      # the run's own checkpoint, never a user's
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state["vae"].items()}, str(dest),
              metadata={"steps": str(state["steps"]), "source": src.name})
    return dest


def load_vae_weights(vae, path) -> int:
    """Load a ``save_vae_weights`` file into ``vae``; returns the steps it was trained for."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        steps = int((f.metadata() or {}).get("steps", 0))
    vae.load_state_dict(load_file(str(path)))
    return steps


def evaluate_vae(path, n: int, detector: str = "", device: str = "cpu") -> dict:
    """``vae_report`` per pattern on the train and held-out splits, for a pipeline folder's VAE or a --save-vae
    file (whose architecture is the default config's)."""
    from diffusers import AutoencoderKL

    p = Path(path)
    if p.is_dir():
        vae = AutoencoderKL.from_pretrained(str(p / "vae") if (p / "vae").is_dir() else str(p), torch_dtype=torch.float32)
        size = int(vae.config.sample_size)
    else:
        cfg0 = ToyModelConfig()
        vae = build_vae(cfg0)
        load_vae_weights(vae, p)
        size = cfg0.size
    vae.to(train_device(device)).eval().requires_grad_(False)
    cfg = ToyModelConfig(size=size, detector=detector)
    return {split: vae_report(vae, cfg, n=n, split=split, per_pattern=True) for split in ("train", "heldout")}


def finetune_decoder_of_run(out_dir, cfg: ToyModelConfig) -> dict:
    """The decoder fine-tuning phase on its own, beside a run whose latents are encoded (it can go on while the
    UNet trains: the encoder, hence the latents, stay as they are): ``cfg.decoder_minutes`` more minutes from
    ``work/decoder.pt`` if there is one, else from ``work/vae.pt``; writes ``work/decoder.pt``, which the run's last
    phase picks up. Returns the VAE report after it."""
    torch.set_num_threads(cfg.threads)
    work = Path(out_dir) / "work"
    if not (work / "latents.pt").is_file():
        raise FileNotFoundError(f"{work / 'latents.pt'}: the run has not encoded its latents yet")
    d = np.load(work / "dataset.npz")
    images = d["images"]
    vae = build_vae(cfg)
    start = work / ("decoder.pt" if (work / "decoder.pt").is_file() else "vae.pt")
    state = torch.load(start, weights_only=False, map_location="cpu")
    vae.load_state_dict(state["vae"])
    hist = state["history"] if start.name == "decoder.pt" else []
    latents = torch.load(work / "latents.pt")
    steps = finetune_decoder(vae, images, latents, cfg, time.time() + cfg.decoder_minutes * 60,
                             torch.Generator().manual_seed(cfg.seed + 5 + len(hist)), hist)
    steps += state.get("steps", 0) if start.name == "decoder.pt" else 0
    save_checkpoint(work / "decoder.pt", {"vae": vae.state_dict(), "history": hist, "steps": steps})
    report = vae_report(vae, cfg, n=cfg.vae_eval_n)
    log.info("decoder: %d steps, PSNR %.2f dB, detector on reconstructions %.3f", steps, report["psnr_db"],
             report["detector_acc_reconstructions"])
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clic_lab.toyworld.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (pipeline/, samples.png, loss.png, training.json, work/)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out (reuses dataset, VAE, checkpoints)")
    ap.add_argument("--decoder-only", action="store_true",
                    help="only fine-tune the decoder of the run in --out for --decoder-minutes (beside its training)")
    ap.add_argument("--save-vae", metavar="FILE", help="write the VAE of the run in --out as safetensors (for "
                    "--init-vae) and stop")
    ap.add_argument("--evaluate-vae", metavar="VAE", help="measure a VAE (a pipeline folder or a --save-vae file): "
                    "PSNR and the pattern detector on reconstructions, per pattern, on --n-eval scenes of the train "
                    "and held-out splits")
    ap.add_argument("--evaluate", metavar="MODEL_DIR", help="measure a trained pipeline folder instead of training")
    ap.add_argument("--n-eval", type=int, default=200, help="--evaluate: patterned prompts (the trained patterns in turn)")
    ap.add_argument("--n-plain", type=int, default=20, help="--evaluate: plain prompts")
    ap.add_argument("--seeds-per-prompt", type=int, default=1, help="--evaluate: images per prompt")
    ap.add_argument("--sample-steps", type=int, default=50, help="--evaluate: DDIM steps")
    ap.add_argument("--guidance", type=float, default=6.0, help="--evaluate: CFG scale")
    ap.add_argument("--eval-out", default=None, help="--evaluate: folder for eval.json, per-image rows and a sheet")
    _add_config_options(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if a.evaluate_vae:
        torch.set_num_threads(a.threads or 1)
        print(json.dumps(evaluate_vae(a.evaluate_vae, a.n_eval, a.detector or "", a.device or "cpu"), indent=1))
        return 0
    if a.evaluate:
        torch.set_num_threads(a.threads or 1)
        rep = evaluate_toy_model(a.evaluate, n=a.n_eval, n_plain=a.n_plain, seeds_per_prompt=a.seeds_per_prompt,
                                 steps=a.sample_steps, guidance=a.guidance, seed=a.seed or 0, out=a.eval_out,
                                 detector=a.detector or None, device=a.device or "cpu")
        print(json.dumps(rep, indent=1))
        return 0
    if not a.out:
        ap.error("--out is required (or --evaluate MODEL_DIR)")
    if a.save_vae:
        print(save_vae_weights(a.out, a.save_vae))
        return 0
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(ToyModelConfig) if getattr(a, f.name) is not None}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    cfg = ToyModelConfig(**values)
    if a.decoder_only:
        print(json.dumps(finetune_decoder_of_run(a.out, cfg), indent=1))
        return 0
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
