"""The example images shipped in ``clic/assets/examples``, rendered from the world (so anyone can remake them).

    python -m clic_lab.toyworld.examples --out src/clic/assets/examples

- ``toy_source.png`` / ``toy_source_mask.png``: a yellow chair whose back carries staggered crosses, a held-out
  pattern (the toy model has drawn crosses only on a grid and never saw this combination named or drawn), and the
  back's mask: what ``clic demo`` learns from;
- ``toy_target.png`` / ``toy_target_mask.png``: a plain red chair and its back: where the demo transfers it.

The scenes were picked by eye among the first renders of each kind for a clearly visible back, before any model
was run on them. The pattern was stars on a grid until the 128 px world's VAE was measured: it keeps that pattern
in 0.55 of reconstructions (staggered crosses: 0.96; ``python -m clic_lab.toyworld.train --evaluate-vae``), so a
demo on stars would have measured the VAE, not the method. The choice was made before the UNet was trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from .world import NATIVE_SIZE, render_scene

__all__ = ["DEMO_SOURCE", "DEMO_TARGET", "write_examples"]

#: render_scene arguments of the demo's source and target
DEMO_SOURCE = {"seed": 1, "object_class": "chair", "pattern": "crosses-staggered", "part": "back"}
DEMO_TARGET = {"seed": 103, "object_class": "chair", "pattern": "none"}
#: the part both masks cover
DEMO_PART = "back"


def write_examples(out_dir, size: int = NATIVE_SIZE) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, kwargs in (("toy_source", DEMO_SOURCE), ("toy_target", DEMO_TARGET)):
        scene = render_scene(size=size, **kwargs)
        for suffix, arr in (("", scene.image), ("_mask", scene.part_masks[DEMO_PART].astype(np.uint8) * 255)):
            path = out / f"{name}{suffix}.png"
            Image.fromarray(arr).save(path)
            written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clic_lab.toyworld.examples", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the four PNGs")
    ap.add_argument("--size", type=int, default=NATIVE_SIZE)
    a = ap.parse_args(argv)
    for path in write_examples(a.out, a.size):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
