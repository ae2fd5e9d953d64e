"""Image and mask I/O: reading any common format, the shared resize transform, PNG outputs and grids.

The transform (``fit="crop"``, the default): centre-crop to a square, then resize to the model resolution (bicubic
for images; masks are resized with the same crop, bilinear, then thresholded at ``threshold``: a non-binary mask
means "in the RoI where the value is above the threshold"). A mask whose aspect ratio differs from its image's is
refused. ``fit="stretch"`` is the official code's: the whole image (and its mask) resized to the model resolution
with PIL's bilinear filter, the aspect ratio not kept; ``threshold=None`` keeps a mask's soft values.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .errors import InputError
from .fileio import atomic_path, readable_file

#: the most pixels an input image may have (8000 x 6000 fits); a larger one is refused before it is decoded
MAX_PIXELS = 50_000_000


def _too_large(path, width: int | None, height: int | None) -> InputError:
    size = (f"{width}x{height} ({width * height / 1e6:.0f} megapixels)" if width else
            f"over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (Pillow refuses it as a decompression bomb)")
    return InputError(f"{path}: image is {size}; the limit is {MAX_PIXELS / 1e6:.0f} megapixels: scale it down first")


def _open_header(path) -> Image.Image:
    """``Image.open``: the header only, the pixels are decoded by ``load()``. Pillow's warning about large images
    is ours to give (:data:`MAX_PIXELS` is below its threshold); its error, for the largest, is turned into ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _open(path) -> Image.Image:
    """The image at ``path``, decoded; refused before decoding if it has more than :data:`MAX_PIXELS` pixels (the
    header says how many: a small file can decode into gigabytes). An image in memory is taken as it is
    (:func:`as_pil`)."""
    if not isinstance(path, (str, os.PathLike)):
        return as_pil(path)
    path = readable_file(path)
    try:
        image = _open_header(path)
        if image.width * image.height > MAX_PIXELS:
            raise _too_large(path, image.width, image.height)
        image.load()
    except Image.DecompressionBombError as exc:          # Pillow's own limit, met before ours in some formats
        raise _too_large(path, None, None) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from exc
    return ImageOps.exif_transpose(image)


def as_pil(image, name: str = "image") -> Image.Image:
    """A PIL image of an image given in memory, as diffusers' pipelines take them: PIL; a numpy array ``(H, W)``,
    ``(H, W, 3|4)`` of uint8, or of floats / bools in [0, 1]; a torch tensor ``(H, W)``, ``([1,] 1|3, H, W)`` in
    [0, 1]."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        while t.ndim > 3 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or arr.size == 0:
        raise InputError(f"{name}: not an image (array of shape {arr.shape})")
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise InputError(f"{name}: the values of a float image must be in [0, 1] (as diffusers takes them), got "
                         f"[{arr.min():.3g}, {arr.max():.3g}]")
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="F")
    return Image.fromarray((arr * 255).round().astype(np.uint8))


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def probe_image(path) -> tuple[int, int]:
    """(width, height) of the image at ``path`` as stored, from its header: an :class:`InputError` for a file that is
    not a readable image or has too many pixels, found without decoding it (checks before a model loads)."""
    path = readable_file(path)
    try:
        with _open_header(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise _too_large(path, image.width, image.height)
            return image.size
    except Image.DecompressionBombError as exc:
        raise _too_large(path, None, None) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from exc


def _to_float(image: Image.Image) -> np.ndarray:
    """HxWxC float in [0, 1] for 8-bit, 16-bit, grayscale, palette, RGBA (composited on white) images."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 or image.mode.startswith("I;16") else 255.0
        arr = np.clip(arr / top, 0, 1)[..., None].repeat(3, -1)
        return arr.astype(np.float32)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0, 1)[..., None].repeat(3, -1)
    return np.asarray(_to_rgb8(image), dtype=np.float32) / 255.0


def _to_rgb8(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image of :func:`_to_float`'s values times 255: for 8-bit modes without the float copy (4 bytes
    a channel: the memory of a large photo)."""
    if image.mode in _WIDE_MODES:
        return Image.fromarray((_to_float(image) * 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _mask_values(image: Image.Image) -> np.ndarray:
    """HxW float in [0, 1]: the alpha channel of an RGBA mask that uses it, else the luminance."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
        if alpha.min() < 1.0:
            return alpha
    return _to_float(image).mean(-1)


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


FITS = ("crop", "stretch")


def load_image(path, size: int, fit: str = "crop") -> torch.Tensor:
    """``(3, size, size)`` in [-1, 1]: a file, or an image in memory (:func:`as_pil`); the centre crop resized
    bicubic (``fit="crop"``), or the whole image resized bilinearly (``fit="stretch"``, the official learning
    script's)."""
    image = _open(path)
    pil = _to_rgb8(image)           # the whole image first: a 16-bit one's scale is read from all its pixels
    if fit == "crop":
        pil = pil.crop(center_crop_box(image.width, image.height)).resize((size, size), Image.BICUBIC)
    elif fit == "stretch":
        pil = pil.resize((size, size), Image.BILINEAR)
    else:
        raise ValueError(f"unknown fit {fit!r} ({' | '.join(FITS)})")
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def load_mask(path, size: int, image_size: tuple[int, int] | None = None, threshold: float | None = 0.5,
              allow_full: bool = False, fit: str = "crop") -> torch.Tensor:
    """``(1, size, size)`` float mask, cropped and resized like its image; a file, or a mask in memory
    (:func:`as_pil`); binary (values above ``threshold``), or with ``threshold=None`` its soft values in [0, 1].

    ``image_size`` (w, h) of the image the mask belongs to: a mask of another aspect ratio is refused; one of
    the same aspect ratio but another size is scaled to it first. ``fit="stretch"``: the whole mask, as 8-bit
    grey levels, resized with PIL's bilinear filter (the official learning script's).
    """
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise InputError(f"mask threshold must be in (0, 1), got {threshold}")
    image = _open(path)
    values = _mask_values(image)
    h, w = values.shape
    if image_size is not None:
        iw, ih = image_size
        if abs(w / h - iw / ih) > 0.01:
            path = path if isinstance(path, (str, os.PathLike)) else "the mask"
            raise InputError(f"{path}: mask is {w}x{h} but its image is {iw}x{ih} (different aspect ratio)")
        if (w, h) != (iw, ih) and fit == "crop":
            values = _resize_2d(values, (ih, iw))
            h, w = ih, iw
    if fit == "crop":
        left, top, right, bottom = center_crop_box(w, h)
        values = _resize_2d(values[top:bottom, left:right], (size, size))
    elif fit == "stretch":
        values = pil_resize(values, (size, size), Image.BILINEAR)
    else:
        raise ValueError(f"unknown fit {fit!r} ({' | '.join(FITS)})")
    mask = torch.from_numpy(values.astype(np.float32) if threshold is None else
                            (values > threshold).astype(np.float32))[None]
    check_mask(mask, path if isinstance(path, (str, os.PathLike)) else "mask", allow_full=allow_full)
    return mask


def pil_resize(values: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    """HxW values in [0, 1] as an 8-bit grey image resized by PIL's ``resample`` filter to ``hw``, back in [0, 1]
    (what the official scripts do to a mask file: read as 8 bits, resized by PIL, divided by 255)."""
    grey = Image.fromarray(np.clip(np.round(values * 255), 0, 255).astype(np.uint8))          # mode L
    return np.asarray(grey.resize((hw[1], hw[0]), resample), dtype=np.float32) / 255.0


def load_latent_mask(path, hw: tuple[int, int]) -> torch.Tensor:
    """``(1, 1, h, w)``: a mask file read as 8-bit grey levels and resized straight to the latent size ``hw`` with
    PIL's bicubic filter, soft values in [0, 1] (the official transfer script's blending mask; of a non-square file
    the centre crop, as its image is cropped here, where the official script stretches both)."""
    values = _mask_values(_open(path))
    left, top, right, bottom = center_crop_box(values.shape[1], values.shape[0])
    return torch.from_numpy(pil_resize(values[top:bottom, left:right], hw, Image.BICUBIC))[None, None]


def load_full_size(image_path, mask_path, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """An image ``(3, H, W)`` in [-1, 1] and its binary mask ``(1, H, W)`` at the image's own size, read as
    :func:`load_image` / :func:`load_mask` read them (same modes, alpha and threshold), without the crop."""
    image = _open(image_path)
    pixels = np.asarray(_to_rgb8(image), dtype=np.float32) / 127.5 - 1.0
    values = _mask_values(_open(mask_path))
    if values.shape != (image.height, image.width):
        values = _resize_2d(values, (image.height, image.width))
    mask = torch.from_numpy((values > threshold).astype(np.float32))[None]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), mask


def check_mask(mask: torch.Tensor, name="mask", allow_full: bool = False) -> None:
    if mask.sum() == 0:
        raise InputError(f"{name}: mask is empty (no pixel above the threshold)")
    if not allow_full and bool((mask > 0.5).all()):
        raise InputError(f"{name}: mask covers the whole image; it must mark a local region")


def _resize_2d(values: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def image_size(path) -> tuple[int, int]:
    return _open(path).size


def chessboard_distance(inside: torch.Tensor, cap: int) -> torch.Tensor:
    """``(H, W)`` int32: each pixel's chessboard (Chebyshev) distance to the nearest True pixel of the bool ``inside``,
    capped at ``cap``. Two raster passes of the 3x3 chamfer transform (exact for this metric), each row relaxed from
    the row before and then along itself with a running minimum: O(H W), where dilating with squares of growing
    size costs O(H W cap^2) (hours for a 48-megapixel photo)."""
    height, width = inside.shape
    d = torch.where(inside.cpu(), 0, cap).to(torch.int32)
    x = torch.arange(width, dtype=torch.int32)
    pad = torch.full((1,), cap, dtype=torch.int32)
    for rows in (range(height), range(height - 1, -1, -1)):
        prev = None
        for y in rows:
            row = d[y]
            if prev is not None:            # the three neighbours in the row before, one step away
                near = torch.minimum(prev, torch.minimum(torch.cat([prev[1:], pad]), torch.cat([pad, prev[:-1]])))
                row = torch.minimum(row, near + 1)
            row = torch.minimum(row, x + torch.cummin(row - x, 0).values)                       # from the left
            row = torch.minimum(row, torch.cummin((row + x).flip(0), 0).values.flip(0) - x)     # from the right
            d[y] = prev = row.clamp(max=cap)
    return d


def resize_mask(mask: torch.Tensor, hw: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of ``(..., H, W)`` masks to ``hw``; values stay in [0, 1]. Downscaling is area-aware
    (antialiased: each output cell averages the pixels it covers) unless ``antialias`` is off (plain bilinear: each
    cell interpolates the 4 pixels nearest its centre, as the official code resizes its mask to the latent)."""
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:]).float()
    antialias = antialias and hw[0] < shape[-2]
    out = F.interpolate(flat, size=hw, mode="bilinear", align_corners=False, antialias=antialias)
    return out.reshape(*shape[:-2], *hw).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ outputs


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in [-1, 1] (or ``(1, H, W)`` / ``(H, W)`` in [0, 1]) -> PIL."""
    pixels = pixels.detach().float().cpu()
    if pixels.ndim == 3 and pixels.shape[0] == 3:
        arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(arr)
    arr = (pixels.reshape(pixels.shape[-2:]).clamp(0, 1) * 255).round().byte().numpy()
    return Image.fromarray(arr, mode="L")


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, strength: float = 0.6) -> Image.Image:
    """An attention map (any size, any range) over an image ``(3, H, W)`` in [-1, 1], red = high."""
    base = to_pil(image).convert("RGB")
    heat = heat.detach().float().cpu().reshape(1, 1, *heat.shape[-2:])
    heat = F.interpolate(heat, size=(base.height, base.width), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
    rgb = torch.stack([heat, 0.2 * heat, 1 - heat], -1).numpy()
    out = (1 - strength) * np.asarray(base, dtype=np.float32) / 255 + strength * rgb
    return Image.fromarray((out * 255).clip(0, 255).astype(np.uint8))


def mask_overlay(image: torch.Tensor, mask: torch.Tensor, color=(255, 40, 40), strength: float = 0.5) -> Image.Image:
    base = np.asarray(to_pil(image).convert("RGB"), dtype=np.float32)
    m = F.interpolate(mask.detach().float().cpu().reshape(1, 1, *mask.shape[-2:]), size=base.shape[:2],
                      mode="nearest")[0, 0].numpy()[..., None]
    out = base * (1 - strength * m) + np.array(color, dtype=np.float32) * strength * m
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def grid(images: list[Image.Image], rows: int = 1, labels: list[str] | None = None, cell: int | None = None) -> Image.Image:
    """Images in a rows x cols grid (row-major), resized to a common cell size, optional labels above."""
    cols = -(-len(images) // rows)
    cell = cell or max(max(im.width, im.height) for im in images)
    pad = 14 if labels else 0
    sheet = Image.new("RGB", (cols * cell, rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, r * (cell + pad) + pad))
        if labels and i < len(labels):
            draw.text((c * cell + 2, r * (cell + pad)), labels[i], fill="black")
    return sheet


def save_png(image: Image.Image, path) -> None:
    """Write a PNG atomically (never half a file)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
