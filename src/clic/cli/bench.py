"""``clic bench``: speed and memory of learning, transfer and generation (:mod:`clic_lab.bench`; the numbers of
BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from clic_lab.bench import LEVERS, BenchOptions, format_report, run_bench

from ..builder import SPECS
from ..errors import InputError
from ..fileio import atomic_path
from ..speed import COMPILE_MODES
from .validate import device_or_meta


def register(sub, argv) -> None:
    p = sub.add_parser("bench", help="measure speed and memory of learning, transfer and generation "
                                     "(BENCHMARKS.md numbers come from here)")
    p.add_argument("--model", default="tiny",
                   help=f"a model folder or hub id, or a kind built in memory: {' | '.join(SPECS)} (sd14-random, "
                        "sdxl-random: the full architectures with random weights)")
    p.add_argument("--steps", type=int, default=20, help="timed learning steps after warm-up (0: no timing, e.g. "
                                                                  "with --flops alone)")
    p.add_argument("--warmup", type=int, default=3, help="untimed learning steps first")
    p.add_argument("--device", default=None, type=device_or_meta,
                   help="cuda, mps, cpu, or meta (a kind built without values or memory: --flops and --tensor-memory "
                        "only, e.g. SDXL's step on any machine)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the frozen model (trainable weights stay fp32)")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference path (official code's computation: explicit softmax everywhere, "
                        "fp32, no caching, whole-UNet gradients) and report the speed-up")
    p.add_argument("--levers", action="store_true",
                   help="time each speed/memory lever alone (checkpointing, channels-last, fused Adam, compile)")
    p.add_argument("--lever", action="append", choices=list(LEVERS), default=None, dest="lever_names",
                   help="time only this lever (repeatable; implies --levers)")
    p.add_argument("--sampling", action="store_true", help="also time transfer and generation")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps of transfer and generation")
    p.add_argument("--sampling-compile", metavar="MODE", choices=COMPILE_MODES, default=None,
                   help="also time transfer and generation with --compile-unet --compile-mode MODE (e.g. cudagraphs)")
    p.add_argument("--images", type=int, default=4, help="images of the generation timing (one batch)")
    p.add_argument("--repeats", type=int, default=1, help="sampling timings: best of this many")
    p.add_argument("--profile", action="store_true", help="a profiler table of a few learning steps")
    p.add_argument("--flops", action="store_true",
                   help="count the FLOPs of a learning step (fast and reference path) and the floor they put on 500 "
                        "steps; exact on any device")
    p.add_argument("--tflops", type=float, default=400.0,
                   help="throughput for the --flops floor, TFLOP/s (default 400: a well-fed H100 in bf16)")
    p.add_argument("--tensor-memory", action="store_true",
                   help="peak live-tensor memory of learning counted op by op (an estimate of the GPU peak from any "
                        "device), fast path and with gradient checkpointing")
    p.add_argument("--ops", action="store_true",
                   help="count the operators of one learning step and those that launch device work (the host's "
                        "share of an eager step; exact on any device)")
    p.add_argument("--wall-steps", type=int, default=0,
                   help="also learn this many steps in one run and report its wall time (e.g. 500: the goal measured, "
                        "not extrapolated from the median step)")
    p.add_argument("--all", action="store_true", help="--reference --levers --sampling --profile --flops --ops")
    p.add_argument("--json", default=None, help="also write the result to this JSON file (after every section)")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="measure nothing: print the markdown tables of a --json result (for BENCHMARKS.md)")

    p.set_defaults(func=run)


def run(args) -> None:
    if args.report:
        path = Path(args.report)
        try:
            text = format_report(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise InputError(f"--report {path}: not a readable bench JSON ({exc})") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"--report {path}: not a `clic bench --json` result (no {exc})") from None
        print(text)
        return
    if args.device == "meta":             # shapes without values: counts only, of a kind built here
        asked = (("--all", args.all), ("--steps", args.steps > 0), ("--reference", args.reference),
                 ("--levers", args.levers or args.lever_names), ("--sampling", args.sampling or args.sampling_compile),
                 ("--profile", args.profile), ("--ops", args.ops), ("--wall-steps", args.wall_steps > 0))
        timed = [name for name, on in asked if on]
        if timed:
            raise InputError(f"--device meta counts only (--flops, --tensor-memory): {timed[0]} needs a real device "
                             "(and --steps 0)")
        if args.model not in SPECS:
            raise InputError(f"--device meta builds a kind of model ({' | '.join(SPECS)}); {args.model!r} is not one")
    every = args.all
    opts = BenchOptions(model=args.model, device=args.device, dtype=args.dtype, steps=args.steps,
                        warmup=args.warmup, reference=args.reference or every,
                        levers=args.levers or every or bool(args.lever_names),
                        lever_names=tuple(args.lever_names) if args.lever_names else None,
                        sampling=args.sampling or every or bool(args.sampling_compile),
                        sampling_steps=args.sampling_steps, sampling_compile=args.sampling_compile, images=args.images,
                        repeats=args.repeats, profile=args.profile or every, flops=args.flops or every,
                        tflops=args.tflops, tensor_memory=args.tensor_memory, ops=args.ops or every,
                        wall_steps=args.wall_steps)

    def save(result: dict) -> None:          # after every section: a run cut short keeps what it measured
        with atomic_path(Path(args.json)) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2))

    result = run_bench(opts, on_update=save if args.json else None,
                       log=lambda text: print(text, file=sys.stderr, flush=True))
    if args.json:
        save(result)                          # with what was derived after the last section (speed-ups)
    print(json.dumps(result, indent=2))
