"""The files ``clic match`` and ``clic discover`` write for each image: the mask at the image's own size, the mask
and the token's attention over the image, and a grid of them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..imaging import center_crop_box, grid, heat_overlay, image_size, mask_overlay, to_pil


def output_names(paths: list[str]) -> list[str]:
    """Output stems per input image: the file stem, numbered when two inputs share a stem."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{k:02d}_{s}" for k, s in enumerate(stems)]


def stem_names(stems: list[str]) -> list[str]:
    """The files :func:`mask_files` and :func:`grid_file` write for these stems."""
    return [f"{stem}_{kind}.png" for stem in stems for kind in ("mask", "overlay", "attention")] + ["grid.png"]


def image_sizes(paths: list[str]) -> list[tuple[int, int]]:
    """(w, h) of each image as it is read (EXIF rotation applied); a missing or unreadable file is a one-line error."""
    return [image_size(p) for p in paths]


def full_size_mask(mask: torch.Tensor, image_wh: tuple[int, int]) -> Image.Image:
    """The ``(1, R, R)`` mask of the centre-cropped image as an 'L' PNG of the original image size (zero outside
    the crop), so it can be passed back as ``--mask`` with its image."""
    w, h = image_wh
    left, top, right, bottom = center_crop_box(w, h)
    side = right - left
    m = F.interpolate(mask.float().reshape(1, 1, *mask.shape[-2:]), size=(side, side), mode="bilinear",
                      align_corners=False)[0, 0]
    canvas = Image.new("L", (w, h), 0)
    canvas.paste(to_pil((m >= 0.5).float()), (left, top))
    return canvas


def mask_files(stem: str, image, mask, attention, full_size) -> dict:
    return {f"{stem}_mask.png": full_size_mask(mask, full_size),
            f"{stem}_overlay.png": mask_overlay(image, mask),
            f"{stem}_attention.png": heat_overlay(image, attention)}


def grid_file(names: list[str], images, masks, attentions) -> dict:
    """``grid.png``: the masks over their images (top row) and the token's attention (bottom row), one column per
    image, labelled with its name."""
    cells = [mask_overlay(im, m) for im, m in zip(images, masks)] + [heat_overlay(im, a) for im, a in
                                                                      zip(images, attentions)]
    return {"grid.png": grid(cells, rows=2, labels=list(names) * 2, cell=max(256, images[0].shape[-1]))}
