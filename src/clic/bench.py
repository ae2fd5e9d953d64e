"""``clic bench``: speed and memory of learning, on a model folder or a model built on the fly.

Prints and writes JSON: median learning-step time after warm-up (and its extrapolation to 500 steps), peak
memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS). Speed does not depend on weight values, so
``--model sd14-random`` builds the SD1.4 architecture in memory without writing it to disk.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _backbone(model: str, device, dtype):
    from .builder import SPECS, build_pipeline
    from .models import Backbone, load_backbone, parse_dtype, pick_device

    if model in SPECS:
        pipe = build_pipeline(model)
        device = pick_device(device)
        dt = parse_dtype(dtype)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False).eval().to(device, dt)
        return Backbone(model, pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, dict(pipe.scheduler.config),
                        device, dt, extra={"base_vocab_size": len(pipe.tokenizer)})
    return load_backbone(model, device, dtype)


def bench_learning(model: str = "tiny", steps: int = 20, warmup: int = 3, device=None, dtype="fp32", **cfg) -> dict:
    from .learn import learn, make_config

    backbone = _backbone(model, device, dtype)
    size = backbone.resolution
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(1, size, size)
    mask[:, size // 8: size // 2, size // 4: 3 * size // 4] = 1
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step, record):
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = make_config(steps=warmup + steps, object_class="chair", checkpoint_every=0, **cfg)
    t0 = time.perf_counter()
    last[0] = t0
    learn(backbone, [image], [mask], config, progress=False, callback=tick)
    wall = time.perf_counter() - t0
    step = statistics.median(times[warmup:])
    return {"model": model, "device": _device_name(backbone.device), "dtype": dtype, "resolution": size,
            "steps_timed": steps, "step_median_s": round(step, 4), "steps_500_estimate_s": round(500 * step, 1),
            "wall_s": round(wall, 2), "peak_memory_gib": round(_peak_memory(backbone.device), 2),
            "torch": torch.__version__}


def register_cli(sub, add_model_options) -> None:
    p = sub.add_parser("bench", help="measure learning speed and memory (BENCHMARKS.md numbers come from here)")
    p.add_argument("--model", default="tiny", help="a model folder, or tiny | tiny-sd2 | sd14-random built in memory")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference path (official code's computation: explicit softmax everywhere, "
                        "fp32, no caching, whole-UNet gradients) and report the speed-up")

    def run(args):
        result = bench_learning(args.model, args.steps, args.warmup, args.device, args.dtype)
        if args.reference:
            ref = bench_learning(args.model, args.steps, args.warmup, args.device, "fp32", reference_path=True)
            result = {"fast": result, "reference": ref,
                      "speedup": round(ref["step_median_s"] / result["step_median_s"], 2)}
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text)

    p.set_defaults(func=run)
