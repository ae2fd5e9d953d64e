"""``clic demo``: the offline demo (:mod:`clic_lab.demo`): learn a held-out pattern, transfer it, generate with it."""

from __future__ import annotations

from pathlib import Path

from clic_lab.demo import run_demo

from .options import add_device_option


def register(sub, argv) -> None:
    p = sub.add_parser("demo", help="the offline demo: learn a held-out pattern, transfer it, generate with it")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--steps", type=int, default=None, help="learning steps (default: 300 on the toy model)")
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps of transfer and generation (50)")
    p.add_argument("--model", default=None, help="diffusers model (default: the bundled toy model; 'tiny' builds "
                                                 "a tiny random one)")
    add_device_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> None:
    run_demo(args.out, args.model, args.steps, args.sample_steps, args.device, progress=not args.quiet)
    print((Path(args.out) / "report.md").read_text())
