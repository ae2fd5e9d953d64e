"""Pattern detector for toy-world regions: which pattern (or "none") fills a region.

A small CNN reads a 64x64 window of the image, taken at the world's native
128x128 scale (other sizes are resized first) and centred on the region's
bounding box.  Its input is the window's RGB, normalised by the mean
and spread of the region's own pixels (so the pattern and base colours do not
matter) and zeroed outside the region, plus the region mask as a fourth
channel.  It is trained on the world's ground truth (crops of patterned parts
for every pattern, held-out ones included, and of plain parts) and is meant as
an evaluation tool: "does the region carry pattern X after editing?".

Weights are stored with safetensors (no pickle)::

    python -m clic_lab.toyworld.detector --out src/clic_lab/toyworld/assets/detector.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from .world import NATIVE_SIZE, PATTERNABLE_PARTS, PATTERNS, Scene, render_scene

__all__ = [
    "LABELS",
    "DEFAULT_WEIGHTS",
    "PatternDetector",
    "region_window",
    "train_detector",
    "evaluate_detector",
    "scene_regions",
]

#: Detector classes: "none" (plain region) then the patterns, in :data:`PATTERNS` order.
LABELS: Tuple[str, ...] = ("none",) + PATTERNS

#: Shipped weights.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "detector.safetensors"

REF_SIZE = NATIVE_SIZE  # the detector looks at images at this scale
CROP = 64  # window side at REF_SIZE
PAD = 4  # training windows are CROP + 2*PAD, randomly cropped to CROP


# --------------------------------------------------------------------------
# Region windows
# --------------------------------------------------------------------------


def _to_ref(image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
        raise ValueError(f"expected an (H, W, 3) image and an (H, W) mask, got {image.shape} and {mask.shape}")
    if image.dtype != np.uint8:
        img = np.asarray(image, dtype=np.float64)
        if img.max() <= 1.0:
            img = img * 255.0
        image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    h, w = mask.shape
    if (h, w) != (REF_SIZE, REF_SIZE):
        resample = Image.BOX if h > REF_SIZE else Image.BICUBIC
        image = np.asarray(Image.fromarray(image).resize((REF_SIZE, REF_SIZE), resample))
        m = Image.fromarray(mask.astype(np.float32), mode="F").resize((REF_SIZE, REF_SIZE), Image.BOX if h > REF_SIZE else Image.BILINEAR)
        mask = np.asarray(m) >= 0.5
    return image, mask


def region_window(image: np.ndarray, mask: np.ndarray, pad: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Cut the detector's window around ``mask`` out of ``image``.

    Returns ``(rgb, mask)``: ``(S, S, 3)`` uint8 and ``(S, S)`` bool with
    ``S = 64 + 2 * pad``, at the 128x128 scale.  Raises ValueError on an empty mask.
    """
    image, mask = _to_ref(image, mask)
    if not mask.any():
        raise ValueError("empty region mask")
    ys, xs = np.nonzero(mask)
    s = CROP + 2 * pad
    cy = (ys.min() + ys.max() + 1) // 2
    cx = (xs.min() + xs.max() + 1) // 2
    y0 = int(np.clip(cy - s // 2, 0, REF_SIZE - s)) if s <= REF_SIZE else 0
    x0 = int(np.clip(cx - s // 2, 0, REF_SIZE - s)) if s <= REF_SIZE else 0
    rgb = np.zeros((s, s, 3), dtype=np.uint8)
    msk = np.zeros((s, s), dtype=bool)
    ci = image[y0 : y0 + s, x0 : x0 + s]
    cm = mask[y0 : y0 + s, x0 : x0 + s]
    rgb[: ci.shape[0], : ci.shape[1]] = ci
    msk[: cm.shape[0], : cm.shape[1]] = cm
    return rgb, msk


def _prepare(rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) float in [0,1] + (B,1,S,S) {0,1} -> (B,4,S,S) network input."""
    n = mask.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    mean = (rgb * mask).sum(dim=(2, 3), keepdim=True) / n
    var = (((rgb - mean) * mask) ** 2).sum(dim=(1, 2, 3), keepdim=True) / (3 * n)
    x = (rgb - mean) / (var.sqrt() + 0.05) * mask
    return torch.cat([x, mask * 2.0 - 1.0], dim=1)


# --------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------


def _block(i: int, o: int) -> List[nn.Module]:
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


class _Net(nn.Module):
    def __init__(self, n_classes: int = len(LABELS), width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(4, w),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *_block(4 * w, 6 * w),
            nn.MaxPool2d(2),
            *_block(6 * w, 8 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PatternDetector:
    """Classifies the pattern inside an image region.

    Use :meth:`load` (default: the shipped weights) then :meth:`predict`.
    """

    def __init__(self, net: Optional[_Net] = None, width: int = 16, meta: Optional[Dict[str, str]] = None):
        self.net = net if net is not None else _Net(width=width)
        self.net.eval()
        self.width = width
        self.labels: Tuple[str, ...] = LABELS
        self.meta: Dict[str, str] = dict(meta or {})

    # -- io ------------------------------------------------------------------
    def save(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        meta = dict(self.meta)
        meta.update({"labels": json.dumps(list(self.labels)), "width": str(self.width), "crop": str(CROP), "ref_size": str(REF_SIZE)})
        save_file(state, str(path), metadata=meta)

    @classmethod
    def load(cls, path=None) -> "PatternDetector":
        """Load weights saved by :meth:`save` (default: the shipped ``toyworld_detector.safetensors``)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        labels = tuple(json.loads(meta.get("labels", json.dumps(list(LABELS)))))
        if labels != LABELS:
            raise ValueError(f"{path}: detector labels {labels} do not match this world's {LABELS}")
        width = int(meta.get("width", 16))
        det = cls(width=width, meta=meta)
        det.net.load_state_dict(load_file(str(path)))
        det.net.eval()
        return det

    # -- inference -------------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Class probabilities ``(N, len(LABELS))`` for N (image, region mask) pairs."""
        wins = [region_window(im, m) for im, m in zip(images, masks)]
        if not wins:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        rgb = torch.from_numpy(np.stack([w[0] for w in wins])).permute(0, 3, 1, 2).float() / 255.0
        msk = torch.from_numpy(np.stack([w[1] for w in wins])).unsqueeze(1).float()
        out = []
        self.net.eval()
        for i in range(0, len(wins), batch_size):
            out.append(F.softmax(self.net(_prepare(rgb[i : i + batch_size], msk[i : i + batch_size])), dim=1))
        return torch.cat(out).numpy()

    def predict(self, image: np.ndarray, mask: np.ndarray) -> Tuple[str, np.ndarray]:
        """Return ``(label, probs)``: label is a pattern name or ``"none"``; ``probs``
        is aligned with :attr:`labels` (``("none",) + PATTERNS``)."""
        p = self.predict_proba([image], [mask])[0]
        return self.labels[int(p.argmax())], p

    def predict_batch(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> List[str]:
        p = self.predict_proba(images, masks)
        return [self.labels[int(i)] for i in p.argmax(axis=1)]


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _seeds(n: int, key: Sequence[int]) -> List[int]:
    return [int(s) for s in np.random.SeedSequence(list(key)).generate_state(n, dtype=np.uint64) >> np.uint64(1)]


def scene_regions(scene: Scene, rng: Optional[np.random.Generator] = None, plain_extra: float = 0.0) -> List[Tuple[np.ndarray, int]]:
    """Labelled regions of a scene: ``[(mask, label index in LABELS), ...]``.

    The patterned part (if any) gives one region with its pattern; a plain scene
    gives one random plain part (a patternable one 3 times out of 4); with
    probability ``plain_extra`` a patterned scene also gives a plain patternable part.
    """
    rng = rng if rng is not None else np.random.default_rng(scene.seed)
    out: List[Tuple[np.ndarray, int]] = []
    visible = {n: m for n, m in scene.part_masks.items() if m.sum() >= 12}
    if scene.pattern is not None and scene.part in visible:
        out.append((visible[scene.part], LABELS.index(scene.pattern)))
        plain = [p for p in PATTERNABLE_PARTS[scene.object_class] if p != scene.part and p in visible]
        if plain and rng.random() < plain_extra:
            out.append((visible[plain[int(rng.integers(len(plain)))]], 0))
    elif scene.pattern is None:
        pat = [p for p in PATTERNABLE_PARTS[scene.object_class] if p in visible]
        pool = pat if (pat and rng.random() < 0.75) else list(visible)
        if pool:
            out.append((visible[pool[int(rng.integers(len(pool)))]], 0))
    return out


def _make_windows(seeds: Sequence[int], size: int, pattern_prob: float, pad: int, rng: np.random.Generator, plain_extra: float = 0.0):
    rgbs, masks, ys = [], [], []
    for s in seeds:
        sc = render_scene(s, size=size, split="any", pattern_prob=pattern_prob)
        for m, y in scene_regions(sc, rng, plain_extra):
            r, mm = region_window(sc.image, m, pad=pad)
            rgbs.append(r)
            masks.append(mm)
            ys.append(y)
    rgb = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).contiguous()
    msk = torch.from_numpy(np.stack(masks)).unsqueeze(1).contiguous()
    return rgb, msk, torch.tensor(ys, dtype=torch.long)


def _augment(rgb: torch.Tensor, msk: torch.Tensor, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random window shift, flips, channel permutation, blur and noise."""
    b, _, s, _ = rgb.shape
    dy, dx = torch.randint(0, s - CROP + 1, (2,), generator=g).tolist()
    rgb = rgb[:, :, dy : dy + CROP, dx : dx + CROP].float() / 255.0
    msk = msk[:, :, dy : dy + CROP, dx : dx + CROP].float()
    if torch.rand(1, generator=g).item() < 0.5:
        rgb, msk = rgb.flip(3), msk.flip(3)
    if torch.rand(1, generator=g).item() < 0.5:
        rgb, msk = rgb.flip(2), msk.flip(2)
    rgb = rgb[:, torch.randperm(3, generator=g)]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = ((k[:, None] * k[None, :]) / 16.0).expand(3, 1, 3, 3).contiguous()
    for p_blur in (0.3, 0.15):  # one or two passes of a 3x3 binomial blur (decoded images are softer than renders)
        blur = torch.rand(b, 1, 1, 1, generator=g) < p_blur
        if blur.any():
            soft = F.conv2d(F.pad(rgb, (1, 1, 1, 1), mode="replicate"), k, groups=3)
            rgb = torch.where(blur, soft, rgb)
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 0.04
    rgb = (rgb + sigma * torch.randn(rgb.shape, generator=g)).clamp(0, 1)
    return rgb, msk


# --------------------------------------------------------------------------
# Training / evaluation
# --------------------------------------------------------------------------


def train_detector(
    n: int = 6000,
    seed: int = 0,
    out=None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 3e-3,
    n_eval: int = 1500,
    size: int = NATIVE_SIZE,
    width: int = 16,
    threads: Optional[int] = 1,
    verbose: bool = True,
) -> Dict[str, object]:
    """Train a :class:`PatternDetector` on ``n`` fresh scenes, evaluate it on
    ``n_eval`` scenes with other seeds, and save it to ``out`` (if given).

    Returns a metrics dict (``accuracy`` on the held-out seeds, per-class
    accuracy, confusion matrix, timings); the detector itself is ``metrics["detector"]``.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    train_seeds = _seeds(n, [seed, 0])
    rgb, msk, ys = _make_windows(train_seeds, size, 0.9, PAD, rng, plain_extra=0.05)
    t_data = time.time() - t0
    if verbose:
        counts = torch.bincount(ys, minlength=len(LABELS)).tolist()
        print(f"[detector] {len(ys)} training regions from {n} scenes in {t_data:.1f}s; per class {counts}", flush=True)

    net = _Net(width=width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(ys) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    net.train()
    for ep in range(epochs):
        perm = torch.randperm(len(ys), generator=g)
        tot, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x_rgb, x_m = _augment(rgb[idx], msk[idx], g)
            logits = net(_prepare(x_rgb, x_m))
            loss = F.cross_entropy(logits, ys[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            correct += int((logits.argmax(1) == ys[idx]).sum())
            seen += len(idx)
        if verbose:
            print(f"[detector] epoch {ep + 1}/{epochs} loss {tot / seen:.3f} train acc {correct / seen:.3f} ({time.time() - t0:.0f}s)", flush=True)
    net.eval()
    t_train = time.time() - t0
    meta = {
        "seed": str(seed),
        "n_train_scenes": str(n),
        "epochs": str(epochs),
        "size": str(size),
        "command": f"python -m clic_lab.toyworld.detector --n {n} --seed {seed} --epochs {epochs}",
    }
    det = PatternDetector(net, width=width, meta=meta)
    metrics = evaluate_detector(det, n=n_eval, seed=seed, size=size)
    metrics.update({"n_train_regions": int(len(ys)), "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1)})
    det.meta["heldout_accuracy"] = f"{metrics['accuracy']:.4f}"
    det.meta["n_eval_regions"] = str(metrics["n"])
    if out is not None:
        det.save(out)
        metrics["path"] = str(out)
    metrics["detector"] = det
    return metrics


def evaluate_detector(detector: PatternDetector, n: int = 1000, seed: int = 0, size: int = NATIVE_SIZE, split: str = "any") -> Dict[str, object]:
    """Accuracy of ``detector`` on the regions of ``n`` scenes.

    Scene seeds come from the stream ``SeedSequence([seed, 1])`` while
    :func:`train_detector` draws from ``[seed, 0]``: 63-bit seeds from independent
    streams, so evaluation scenes are unseen in training."""
    seeds = _seeds(n, [seed, 1])
    rng = np.random.default_rng([seed, 8])
    images, masks, ys = [], [], []
    for s in seeds:
        sc = render_scene(s, size=size, split=split, pattern_prob=0.9)
        for m, y in scene_regions(sc, rng, plain_extra=0.1):
            images.append(sc.image)
            masks.append(m)
            ys.append(y)
    probs = detector.predict_proba(images, masks)
    pred = probs.argmax(1)
    ys_a = np.asarray(ys)
    conf = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(conf, (ys_a, pred), 1)
    per_class = {LABELS[i]: (float(conf[i, i] / conf[i].sum()) if conf[i].sum() else float("nan")) for i in range(len(LABELS))}
    return {"accuracy": float((pred == ys_a).mean()), "n": int(len(ys_a)), "per_class": per_class, "confusion": conf.tolist(), "labels": list(LABELS)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Train the toy-world pattern detector and report held-out accuracy")
    ap.add_argument("--out", required=True, help="where to write the .safetensors weights")
    ap.add_argument("--n", type=int, default=6000, help="training scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-eval", type=int, default=1500, help="evaluation scenes (unseen seeds)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    m = train_detector(n=a.n, seed=a.seed, out=a.out, epochs=a.epochs, n_eval=a.n_eval, threads=a.threads)
    print(f"held-out accuracy {m['accuracy']:.4f} on {m['n']} regions ({m['total_seconds']}s total)")
    print("per class: " + ", ".join(f"{k} {v:.3f}" for k, v in m["per_class"].items()))
    print(f"saved {m['path']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
