"""``clic make-model``: a random-init pipeline in the diffusers layout, built offline (tests, benchmarks)."""

from __future__ import annotations

from ..builder import SPECS, make_model


def register(sub, argv) -> None:
    p = sub.add_parser("make-model", help=f"write a random-init pipeline ({', '.join(SPECS)}) in the diffusers "
                                          "layout, for tests and benchmarks")
    p.add_argument("kind", help=" | ".join(SPECS))
    p.add_argument("dir", help="output folder (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.set_defaults(func=run)


def run(args) -> None:
    print(make_model(args.kind, args.dir, seed=args.seed, dtype=args.dtype))
