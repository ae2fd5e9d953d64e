"""Contact sheets of toy-world scenes, for eyeballing renders and masks."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .world import Scene, sample_scenes

__all__ = ["part_mask_image", "contact_sheet", "write_contact_sheet"]

_PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
    ],
    dtype=np.uint8,
)


def part_mask_image(scene: Scene) -> np.ndarray:
    """``(H, W, 3)`` uint8 image: each part mask in its own colour, background black,
    the patterned part outlined in white."""
    out = np.zeros(scene.image.shape, dtype=np.uint8)
    for k, m in enumerate(scene.part_masks.values()):
        out[m] = _PALETTE[k % len(_PALETTE)]
    pm = scene.pattern_mask
    if pm.any():
        edge = pm & ~(
            np.pad(pm, 1)[2:, 1:-1] & np.pad(pm, 1)[:-2, 1:-1] & np.pad(pm, 1)[1:-1, 2:] & np.pad(pm, 1)[1:-1, :-2]
        )
        out[edge] = 255
    return out


def contact_sheet(scenes: Sequence[Scene], cols: int = 4, zoom: int = 3, captions: bool = True) -> Image.Image:
    """Tile ``scenes`` as (render | part masks) pairs with the caption below."""
    size = scenes[0].size * zoom
    text_h = 24 if captions else 0
    cell_w, cell_h = 2 * size + 6, size + text_h + 6
    rows = (len(scenes) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, sc in enumerate(scenes):
        r, c = divmod(i, cols)
        x, y = c * cell_w, r * cell_h
        img = Image.fromarray(sc.image).resize((size, size), Image.NEAREST)
        masks = Image.fromarray(part_mask_image(sc)).resize((size, size), Image.NEAREST)
        sheet.paste(img, (x, y))
        sheet.paste(masks, (x + size, y))
        if captions:
            text = sc.caption.replace("a ", "", 1)
            draw.text((x + 2, y + size + 1), text[:44], fill=(0, 0, 0))
            draw.text((x + 2, y + size + 12), f"seed {sc.seed % 100000}", fill=(90, 90, 90))
    return sheet


def write_contact_sheet(path: str, n: int = 16, seed: int = 0, cols: int = 4, zoom: int = 3, **render_kwargs) -> str:
    """Render ``n`` scenes with :func:`sample_scenes` and save a contact sheet PNG at ``path``."""
    scenes = sample_scenes(n, seed, **render_kwargs)
    contact_sheet(scenes, cols=cols, zoom=zoom).save(path)
    return path


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description="Write a contact sheet of toy-world scenes")
    ap.add_argument("--out", default="toyworld_sheet.png")
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--split", default="any")
    a = ap.parse_args()
    print(write_contact_sheet(a.out, n=a.n, seed=a.seed, size=a.size, split=a.split))
