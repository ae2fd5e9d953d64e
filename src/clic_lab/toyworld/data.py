"""The toy model's data: the training set rendered once, pixel conversions and the device helpers every phase
shares."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .world import render_scene, scene_seeds

log = logging.getLogger("clic_lab.toyworld.train")

__all__ = ["read_threads_file", "render_dataset", "to_pixels", "to_uint8", "psnr", "train_device", "device_name", "device_of",
           "bf16_native", "autocast"]


def _render_chunk(seeds: List[int], size: int, split: str) -> Tuple[np.ndarray, List[str]]:
    scenes = [render_scene(s, size=size, split=split) for s in seeds]
    return np.stack([sc.image for sc in scenes]), [sc.caption for sc in scenes]


def render_dataset(n: int, seed: int, size: int = 64, split: str = "train",
                   workers: int = 1) -> Tuple[np.ndarray, List[str]]:
    """``n`` scenes with seeds :func:`scene_seeds` ``(n, seed)``: ``(n, size, size, 3)`` uint8 and captions; the
    same arrays with any number of ``workers`` (processes)."""
    seeds = scene_seeds(n, seed)
    chunk = 1000
    parts = [seeds[i:i + chunk] for i in range(0, n, chunk)]
    images, captions = np.empty((n, size, size, 3), dtype=np.uint8), []
    if workers > 1 and len(parts) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(parts))) as pool:
            results = pool.map(_render_chunk, parts, [size] * len(parts), [split] * len(parts))
    else:
        results = (_render_chunk(part, size, split) for part in parts)
    for i, (imgs, caps) in enumerate(results):
        images[i * chunk: i * chunk + len(imgs)] = imgs
        captions += caps
        if (i + 1) % 5 == 0:
            log.info("rendered %d/%d scenes", len(captions), n)
    return images, captions


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_of(module) -> torch.device:
    return next(module.parameters()).device


def bf16_native(device: torch.device) -> bool:
    """bf16 is a speed-up on a GPU and on CPUs with bf16 instructions, a ~10x slow-down where it is emulated."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, enabled: Optional[bool]):
    if enabled is None:
        enabled = bf16_native(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_device(name: str) -> torch.device:
    """``cfg.device`` checked: a one-line error when CUDA is asked for and absent."""
    from clic.errors import InputError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device (cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def to_pixels(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR (dB) over images of uint8 arrays ``(N, H, W, 3)``."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = d.reshape(len(a), -1).mean(1).clip(1e-10)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))


def read_threads_file(path: str) -> None:
    """Set torch's CPU threads from the number in ``path`` (a long run's knob: change it while the run goes on);
    nothing when ``path`` is empty, unreadable or not a positive int."""
    if not path:
        return
    try:
        n = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return
    if n >= 1 and n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("threads: %d", n)
