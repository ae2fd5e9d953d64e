"""``clic info``: a concept file's metadata."""

from __future__ import annotations

import json

from ..concept import Concept


def register(sub, argv) -> None:
    p = sub.add_parser("info", help="print a concept file's metadata")
    p.add_argument("concept")
    p.set_defaults(func=run)


def run(args) -> None:
    concept = Concept.load(args.concept)
    n = sum(v.numel() for v in concept.attn_weights.values())
    print(json.dumps({**concept.meta, "attention_parameters": n}, indent=2, default=str))
