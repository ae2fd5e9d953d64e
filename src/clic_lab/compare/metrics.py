"""Evaluation of a transfer (used by ``clic evaluate`` and the comparison runner, ``clic benchmark``).

Images are ``(3, H, W)`` tensors in [-1, 1] (as :func:`clic.imaging.load_image` returns them), masks ``(1, H, W)``
or ``(H, W)`` in {0, 1}; every metric converts images to [0, 1] first (data range 1).

=========================  =====================================================================================
preservation (outside the  ``psnr``: 10 log10(1 / MSE) over the pixels outside M_tg.
target mask M_tg)          ``ssim``: SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
                           K2 = 0.03, per channel, averaged over the window positions that do not touch M_tg.
                           ``lpips``: LPIPS (Zhang et al. 2018) of the result with M_tg pasted from the target, only
                           when the ``lpips`` package *and* its backbone weights are already on disk (never
                           downloaded); otherwise skipped with a note.
concept fidelity           ``fidelity``: cosine similarity, in the embedding of an image encoder (CLIP vision or
                           DINO through transformers), between the source concept region (bounding box of M_s,
                           outside M_s grey) and the edited region (same crop of M_tg on the result). Skipped with a
                           note when no encoder is given or it cannot be loaded offline.
localisation               ``attn_iou``: IoU of v*'s attention map, thresholded at half its maximum, with M_tg;
                           ``attn_mass``: the fraction of the map's mass inside M_tg.
cost                       :func:`measure`: wall seconds of a phase and its peak memory (GPU:
                           ``torch.cuda.max_memory_allocated``; CPU: peak RSS of the process during the phase).
=========================  =====================================================================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from transformers import AutoConfig, AutoModel, CLIPVisionModel, CLIPVisionModelWithProjection

from clic.errors import InputError, ModelError

log = logging.getLogger(__name__)

SSIM_K1, SSIM_K2 = 0.01, 0.03


def _unit(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` in [-1, 1] -> ``(1, 3, H, W)`` float64 in [0, 1]."""
    image = torch.as_tensor(image).detach().cpu().double()
    if image.ndim == 3:
        image = image[None]
    return ((image.clamp(-1, 1) + 1) / 2)


def _mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Any ``(H, W)`` / ``(1, H, W)`` / ``(1, 1, H, W)`` mask -> ``(1, 1, H, W)`` float64 in {0, 1}."""
    mask = torch.as_tensor(mask).detach().cpu().double()
    mask = mask.reshape(1, 1, *mask.shape[-2:])
    if mask.shape[-2:] != like.shape[-2:]:
        raise InputError(f"mask {tuple(mask.shape[-2:])} and image {tuple(like.shape[-2:])} differ in size")
    return (mask > 0.5).double()


# ---------------------------------------------------------------------------------------------- preservation


def psnr(result: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB (data range 1) over the pixels *outside* ``mask`` (all pixels without a mask); inf if equal."""
    a, b = _unit(result), _unit(target)
    keep = torch.ones_like(a[:, :1]) if mask is None else 1 - _mask(mask, a)
    n = keep.sum() * a.shape[1]
    if n == 0:
        return float("nan")
    mse = (((a - b) ** 2) * keep).sum() / n
    return float("inf") if mse == 0 else float(10 * torch.log10(1 / mse))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """``(size, size)`` Gaussian weights summing to 1 (the SSIM window of Wang et al.)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Per-channel SSIM at every window position inside the image (no padding): ``(B, C, H-k+1, W-k+1)``.

    ``a``, ``b``: ``(B, C, H, W)`` in [0, 1]. With w the window weights, mu = sum w x, sigma^2 = sum w x^2 - mu^2,
    sigma_ab = sum w ab - mu_a mu_b, and
    SSIM = (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2, L = 1.
    """
    c = a.shape[1]
    w = window.to(a.dtype)[None, None].expand(c, 1, -1, -1)

    def filt(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(result: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, window_size: int = 11,
         sigma: float = 1.5) -> float:
    """Mean SSIM over channels and over the window positions that do not overlap ``mask`` (all positions without a
    mask); nan if every window touches the mask."""
    a, b = _unit(result), _unit(target)
    if min(a.shape[-2:]) < window_size:
        raise InputError(f"images of {tuple(a.shape[-2:])} pixels are smaller than the {window_size}px SSIM window")
    values = ssim_map(a, b, gaussian_window(window_size, sigma))                 # (1, C, H', W')
    if mask is None:
        return float(values.mean())
    touches = F.max_pool2d(_mask(mask, a), window_size, stride=1)                 # (1, 1, H', W')
    keep = (1 - touches).expand_as(values)
    if keep.sum() == 0:
        return float("nan")
    return float((values * keep).sum() / keep.sum())


def _lpips_weights_present(net: str) -> tuple[bool, str]:
    """Whether ``lpips`` and the torchvision backbone weights it loads are on disk (it would download them)."""
    try:  # optional packages, looked for only when LPIPS is asked for
        import lpips  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        return False, f"LPIPS skipped: the '{exc.name}' package is not installed (pip install lpips)"
    files = {"alex": "alexnet-owt-", "vgg": "vgg16-", "squeeze": "squeezenet1_1-"}
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    if not folder.is_dir() or not any(p.name.startswith(files[net]) for p in folder.iterdir()):
        return False, f"LPIPS skipped: the {net} backbone weights are not in {folder} (they are never downloaded here)"
    return True, ""


_LPIPS_MODELS: dict[str, torch.nn.Module] = {}


def lpips_distance(result: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   net: str = "alex") -> tuple[float | None, str]:
    """LPIPS between ``target`` and ``result`` with the region ``mask`` pasted from the target (so only the change
    outside the mask counts). Returns ``(value, "")`` or ``(None, note)`` when LPIPS is unavailable offline."""
    ok, note = _lpips_weights_present(net)
    if not ok:
        return None, note
    import lpips  # optional (see _lpips_weights_present)

    if net not in _LPIPS_MODELS:
        _LPIPS_MODELS[net] = lpips.LPIPS(net=net, verbose=False).eval()
    a, b = _unit(result).float(), _unit(target).float()
    if mask is not None:
        m = _mask(mask, a).float()
        a = m * b + (1 - m) * a
    with torch.no_grad():
        return float(_LPIPS_MODELS[net](a * 2 - 1, b * 2 - 1).mean()), ""


# ---------------------------------------------------------------------------------------------- concept fidelity

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageEncoder:
    """A frozen image encoder from transformers: CLIP vision (``image_embeds`` or ``pooler_output``) or a ViT/DINO
    model (``pooler_output``, else the CLS token). Inputs are resized to the model's ``image_size`` and normalised
    with the checkpoint's image-processor statistics (CLIP's or ImageNet's when it ships none)."""

    model: torch.nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu") -> "ImageEncoder":
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        kw = {"local_files_only": offline or os.path.isdir(name_or_path)}
        try:
            config = AutoConfig.from_pretrained(name_or_path, **kw)
            kind = config.model_type
            if kind == "clip":
                model = CLIPVisionModelWithProjection.from_pretrained(name_or_path, **kw)
                vision = config.vision_config
            elif kind == "clip_vision_model":
                model = CLIPVisionModel.from_pretrained(name_or_path, **kw)
                vision = config
            else:
                model = AutoModel.from_pretrained(name_or_path, **kw)
                vision = config
        except (OSError, ValueError) as exc:
            raise ModelError(f"image encoder {name_or_path!r} cannot be loaded ({str(exc).splitlines()[0]})") from exc
        mean, std = (_CLIP_MEAN, _CLIP_STD) if kind.startswith("clip") else (_IMAGENET_MEAN, _IMAGENET_STD)
        stats = _processor_stats(name_or_path)
        if stats is not None:
            mean, std = stats
        size = getattr(vision, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else int(size)
        return cls(model.eval().requires_grad_(False).to(device), size, tuple(mean), tuple(std), str(name_or_path))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> L2-normalised embeddings ``(B, D)``."""
        device = next(self.model.parameters()).device
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        out = self.model(pixel_values=((x - mean) / std).to(device))
        if getattr(out, "image_embeds", None) is not None:
            emb = out.image_embeds
        elif getattr(out, "pooler_output", None) is not None:
            emb = out.pooler_output
        else:
            emb = out.last_hidden_state[:, 0]
        return F.normalize(emb.float().cpu(), dim=-1)


def _processor_stats(name_or_path: str):
    path = Path(name_or_path) / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return None


def region_crop(image: torch.Tensor, mask: torch.Tensor, background: float = 0.5) -> torch.Tensor:
    """The square bounding box of ``mask`` on ``image`` (``(1, 3, s, s)`` in [0, 1]); pixels outside the mask are set
    to ``background`` (mid-grey) so that only the region's content is compared."""
    a = _unit(image)
    m = _mask(mask, a)
    ys, xs = torch.nonzero(m[0, 0] > 0, as_tuple=True)
    if len(ys) == 0:
        raise InputError("empty mask: no region to compare")
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = max(y1 - y0, x1 - x0)
    h, w = a.shape[-2:]
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top = min(max(cy - side // 2, 0), max(h - side, 0))
    left = min(max(cx - side // 2, 0), max(w - side, 0))
    crop = a * m + background * (1 - m)
    return crop[..., top:top + side, left:left + side].float()


def concept_fidelity(encoder: ImageEncoder, source: torch.Tensor, source_mask: torch.Tensor, result: torch.Tensor,
                     target_mask: torch.Tensor) -> float:
    """Cosine similarity of the encoder embeddings of the source concept region and the edited region."""
    a = encoder.embed(region_crop(source, source_mask))
    b = encoder.embed(region_crop(result, target_mask))
    return float((a * b).sum())


# ---------------------------------------------------------------------------------------------- localisation


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two binary masks of the same size (values > 0.5 are in); nan if both are empty."""
    a, b = torch.as_tensor(a) > 0.5, torch.as_tensor(b) > 0.5
    union = (a | b).sum()
    return float("nan") if union == 0 else float((a & b).sum() / union)


def attention_localisation(attention: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How well v*'s attention map ``(h, w)`` (any resolution, non-negative) sits on ``mask`` ``(H, W)``.

    ``attn_iou``: IoU of {attention >= half its maximum} with the mask (both at the map's resolution; the mask is
    resized to the map by area averaging (bilinear when the map is larger) and thresholded at 0.5);
    ``attn_mass``: sum(A * M) / sum(A) with the area-averaged mask.
    """
    attn = torch.as_tensor(attention).detach().float().cpu()
    attn = attn.reshape(attn.shape[-2:]).clamp_min(0)
    m = (torch.as_tensor(mask).detach().float().cpu() > 0.5).float()
    m = m.reshape(1, 1, *m.shape[-2:])
    if m.shape[-2] >= attn.shape[-2] and m.shape[-1] >= attn.shape[-1]:
        m = F.adaptive_avg_pool2d(m, tuple(attn.shape))[0, 0]
    else:
        m = F.interpolate(m, size=tuple(attn.shape), mode="bilinear", align_corners=False)[0, 0]
    total = attn.sum()
    mass = float((attn * m).sum() / total) if total > 0 else float("nan")
    peak = attn.max()
    hot = attn >= 0.5 * peak if peak > 0 else torch.zeros_like(attn, dtype=torch.bool)
    return {"attn_iou": iou(hot.float(), (m >= 0.5).float()), "attn_mass": mass}


# ---------------------------------------------------------------------------------------------- cost


def _rss_peak_reset() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20                 # kB -> GiB
    except OSError:
        pass
    scale = 2**30 if os.uname().sysname == "Darwin" else 2**20       # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


@dataclass
class Cost:
    """Wall time and peak memory of one phase. ``memory`` says what the peak is: "cuda" (max allocated tensors),
    "rss" (peak resident set of the process during the phase) or "rss-lifetime" (the process's peak so far, when the
    kernel cannot reset the counter)."""

    wall_s: float = 0.0
    peak_gib: float = 0.0
    memory: str = ""
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def measure(device: str | torch.device = "cpu"):
    """``with measure(device) as cost: ...`` fills ``cost.wall_s`` and ``cost.peak_gib`` for the block."""
    device = torch.device(device)
    cost = Cost()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cost.memory = "cuda"
    else:
        cost.memory = "rss" if _rss_peak_reset() else "rss-lifetime"
    start = time.perf_counter()
    try:
        yield cost
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            cost.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            cost.peak_gib = _rss_peak_gib()
        cost.wall_s = time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- all at once


def evaluate(result: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, source: torch.Tensor | None = None,
             source_mask: torch.Tensor | None = None, encoder: ImageEncoder | None = None,
             attention: torch.Tensor | None = None, lpips_net: str | None = "alex") -> dict:
    """Every metric that the inputs allow; ``notes`` says which were skipped and why.

    Returns ``{"psnr", "ssim", "lpips", "fidelity", "attn_iou", "attn_mass", "notes"}`` (None where skipped).
    """
    out: dict = {"psnr": psnr(result, target, mask), "ssim": ssim(result, target, mask), "lpips": None,
                 "fidelity": None, "attn_iou": None, "attn_mass": None, "notes": []}
    if lpips_net:
        out["lpips"], note = lpips_distance(result, target, mask, lpips_net)
        if note:
            out["notes"].append(note)
    if source is None or source_mask is None:
        out["notes"].append("fidelity skipped: no source image and source mask given")
    elif encoder is None:
        out["notes"].append("fidelity skipped: no image encoder given (--encoder: a CLIP or DINO path or hub id)")
    else:
        out["fidelity"] = concept_fidelity(encoder, source, source_mask, result, mask)
    if attention is None:
        out["notes"].append("localisation skipped: no attention map of v*")
    else:
        out.update(attention_localisation(attention, mask))
    return out
