"""How well a toy model draws: generated images scored with the pattern detector on the prompted part's expected
region (no ground truth exists for a sample), the prompted colour, and plain prompts; the same scoring on real
renders of the same prompts is the metric's ceiling.

    python -m clic_lab.toyworld.train --evaluate MODEL_DIR --eval-out DIR
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .diffusion import generate
from .world import (CLASSES, COLOURS, HELD_OUT_COMBOS, NATIVE_SIZE, PATTERN_ADJECTIVES, PATTERNABLE_PARTS,
                    TRAIN_PATTERNS, allowed_pairs, render_scene, scene_seeds)

__all__ = ["foreground_mask", "part_priors", "part_region", "top_colours", "dominant_colour", "eval_prompts",
           "score_images", "evaluate_toy_model"]


def _plane_background(img: np.ndarray, border: int = 2) -> np.ndarray:
    """Per-channel least-squares plane through the border pixels: the background (plain or gradient)."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    edge = np.zeros((h, w), dtype=bool)
    edge[:border], edge[-border:], edge[:, :border], edge[:, -border:] = True, True, True, True
    A = np.stack([np.ones(edge.sum()), xx[edge], yy[edge]], 1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(A, img[edge].astype(np.float64), rcond=None)
    full = np.stack([np.ones(h * w), xx.ravel(), yy.ravel()], 1) @ coef
    return full.reshape(h, w, 3)


def foreground_mask(img: np.ndarray, threshold: float = 45.0) -> np.ndarray:
    """Pixels whose RGB distance from the fitted background plane exceeds ``threshold``: the world keeps every
    object colour > 80 away from every background pixel, so this finds the object in renders and samples alike."""
    bg = _plane_background(img)
    return np.linalg.norm(img.astype(np.float64) - bg, axis=-1) > threshold


_PRIOR_GRID = 32


def part_priors(n: int = 150, seed: int = 7, size: int = NATIVE_SIZE,
                classes: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, np.ndarray]]:
    """Per class and patternable part: the frequency with which a pixel of the object's bounding box (resampled
    to 32x32) belongs to the part, over ``n`` plain renders."""
    from PIL import Image

    pri: Dict[str, Dict[str, np.ndarray]] = {}
    for ci, cls in enumerate(CLASSES):
        if classes is not None and cls not in classes:
            continue
        acc = {p: np.zeros((_PRIOR_GRID, _PRIOR_GRID)) for p in PATTERNABLE_PARTS[cls]}
        for s in scene_seeds(n, seed * 100 + ci):
            sc = render_scene(s, size=size, object_class=cls, pattern="none")
            ys, xs = np.nonzero(sc.object_mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            for p in acc:
                m = sc.part_masks[p][y0:y1, x0:x1].astype(np.float32)
                acc[p] += np.asarray(Image.fromarray(m, mode="F").resize((_PRIOR_GRID, _PRIOR_GRID), Image.BILINEAR))
        pri[cls] = {p: a / n for p, a in acc.items()}
    return pri


def part_region(img: np.ndarray, prior: np.ndarray, fg: Optional[np.ndarray] = None,
                threshold: float = 0.5) -> np.ndarray:
    """Where a part should be: ``prior`` stretched over the foreground's bounding box, thresholded, within the
    foreground (falls back to lower thresholds, then to the whole foreground, when that is empty)."""
    from PIL import Image

    fg = foreground_mask(img) if fg is None else fg
    if fg.sum() < 20:
        return fg
    ys, xs = np.nonzero(fg)
    y0, y1 = int(np.percentile(ys, 1)), int(np.percentile(ys, 99)) + 1
    x0, x1 = int(np.percentile(xs, 1)), int(np.percentile(xs, 99)) + 1
    full = np.zeros(fg.shape, dtype=np.float32)
    full[y0:y1, x0:x1] = np.asarray(Image.fromarray(prior.astype(np.float32), mode="F").resize(
        (max(1, x1 - x0), max(1, y1 - y0)), Image.BILINEAR))
    for th in (threshold, 0.35, 0.2):
        region = (full > th) & fg
        if region.sum() >= 12:
            return region
    return fg


def top_colours(img: np.ndarray, mask: np.ndarray, k: int = 2) -> List[str]:
    """The ``k`` named colours (:data:`COLOURS`) nearest to most pixels of ``mask``, most frequent first (fewer if
    fewer occur)."""
    if mask.sum() == 0:
        return []
    names = list(COLOURS)
    ref = np.array([COLOURS[n] for n in names], dtype=np.float64)
    px = img[mask].astype(np.float64)
    near = np.linalg.norm(px[:, None, :] - ref[None], axis=-1).argmin(1)
    counts = np.bincount(near, minlength=len(names))
    return [names[int(i)] for i in np.argsort(-counts, kind="stable")[:k] if counts[i] > 0]


def dominant_colour(img: np.ndarray, mask: np.ndarray) -> Optional[str]:
    """The named colour (:data:`COLOURS`) nearest to most pixels of ``mask``."""
    top = top_colours(img, mask, 1)
    return top[0] if top else None


def eval_prompts(n: int, n_plain: int, seed: int) -> List[dict]:
    """``n`` training (class, part, pattern) triples with random colours, then ``n_plain`` plain objects. The
    patterns take turns (every trained pattern gets ``n / len(TRAIN_PATTERNS)`` prompts); class and part are drawn
    among those the pattern is trained on."""
    rng = np.random.default_rng(seed)
    by_pattern = {p: [(c, part, pat) for c in CLASSES for pat, part in allowed_pairs(c, "train") if pat == p]
                  for p in TRAIN_PATTERNS}
    colours = list(COLOURS)
    out = []
    for _ in range(n):
        pool = by_pattern[TRAIN_PATTERNS[len(out) % len(TRAIN_PATTERNS)]]
        c, part, pat = pool[int(rng.integers(len(pool)))]
        col = colours[int(rng.integers(len(colours)))]
        adj = PATTERN_ADJECTIVES[pat]
        art = "an" if col[0] in "aeiou" else "a"
        phrase = f"{adj} {part}" if part.endswith("s") else f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {part}"
        out.append({"prompt": f"{art} {col} {c} with {phrase}", "class": c, "part": part, "pattern": pat,
                    "colour": col})
    for _ in range(n_plain):
        c = list(CLASSES)[int(rng.integers(len(CLASSES)))]
        col = colours[int(rng.integers(len(colours)))]
        art = "an" if col[0] in "aeiou" else "a"
        out.append({"prompt": f"{art} {col} {c}", "class": c, "part": None, "pattern": None, "colour": col})
    return out


def score_images(images: Sequence[np.ndarray], items: Sequence[dict], det, priors) -> List[dict]:
    """Per image: foreground fraction, pattern label on the prompted part's expected region (patterned prompts)
    or on the region of every part patterned in training (plain prompts), and the dominant named colour."""
    rows = []
    regions, owners = [], []
    for k, (img, it) in enumerate(zip(images, items)):
        fg = foreground_mask(img)
        row = {"fg_frac": float(fg.mean()), "colour_pred": dominant_colour(img, fg)}
        # plain prompts: every part that carries patterns in training (held-out combinations, e.g. house doors,
        # are never patterned there)
        parts = [it["part"]] if it["part"] else [p for p in PATTERNABLE_PARTS[it["class"]]
                                                 if (it["class"], p) not in HELD_OUT_COMBOS]
        for p in parts:
            r = part_region(img, priors[it["class"]][p], fg)
            if r.sum() == 0:
                r = np.ones_like(fg)
            regions.append((img, r))
            owners.append((k, p))
        rows.append(row)
    labels = det.predict_batch([r[0] for r in regions], [r[1] for r in regions]) if regions else []
    for (k, p), lab in zip(owners, labels):
        rows[k].setdefault("labels", {})[p] = lab
    for row, it in zip(rows, items):
        labs = row.get("labels", {})
        if it["pattern"]:
            row["pattern_ok"] = labs.get(it["part"]) == it["pattern"]
        else:
            row["plain_ok"] = all(v == "none" for v in labs.values())
        row["colour_ok"] = row["colour_pred"] == it["colour"]
    return rows


def _summarise(rows: List[dict], items: List[dict]) -> dict:
    pat = [r["pattern_ok"] for r, it in zip(rows, items) if it["pattern"]]
    plain = [r["plain_ok"] for r, it in zip(rows, items) if not it["pattern"]]
    from ..stats import wilson_interval

    per_pattern, per_pattern_ci = {}, {}
    for p in TRAIN_PATTERNS:
        v = [r["pattern_ok"] for r, it in zip(rows, items) if it["pattern"] == p]
        if v:
            per_pattern[p] = round(float(np.mean(v)), 3)
            per_pattern_ci[p] = [round(x, 3) for x in wilson_interval(int(sum(v)), len(v))]
    colour = [r["colour_ok"] for r in rows]
    fg = np.array([r["fg_frac"] for r in rows])
    return {
        "pattern_accuracy": round(float(np.mean(pat)), 4) if pat else None, "n_patterned": len(pat),
        "pattern_accuracy_ci95": [round(x, 4) for x in wilson_interval(int(sum(pat)), len(pat))] if pat else None,
        "plain_accuracy": round(float(np.mean(plain)), 4) if plain else None, "n_plain": len(plain),
        "colour_accuracy": round(float(np.mean(colour)), 4),
        "colour_accuracy_ci95": [round(x, 4) for x in wilson_interval(int(sum(colour)), len(colour))],
        "per_pattern": per_pattern, "per_pattern_ci95": per_pattern_ci,
        "foreground_fraction": {"mean": round(float(fg.mean()), 3), "min": round(float(fg.min()), 3),
                                "max": round(float(fg.max()), 3)},
    }


def evaluate_toy_model(model_dir, n: int = 200, n_plain: int = 20, seeds_per_prompt: int = 1, steps: int = 50,
                       guidance: float = 6.0, seed: int = 0, out: Optional[str] = None,
                       detector: Optional[str] = None, device: str = "cpu") -> dict:
    """Generate ``seeds_per_prompt`` images for each of ``n`` patterned and ``n_plain`` plain training prompts
    (:func:`eval_prompts`) and score them with the shipped pattern detector (:func:`score_images`). The same
    scoring on real renders of the same prompts (unseen seeds) is reported as the metric's ceiling."""
    from clic.models import load_backbone
    from .detector import PatternDetector

    t0 = time.time()
    backbone = load_backbone(str(model_dir), device=device, dtype="fp32")
    det = PatternDetector.load(detector)
    priors = part_priors(size=backbone.resolution)
    items = eval_prompts(n, n_plain, seed)
    items_x = [it for it in items for _ in range(seeds_per_prompt)]
    seeds = [1000 * seed + j for it in items for j in range(seeds_per_prompt)]
    images = generate(backbone, [it["prompt"] for it in items_x], seeds, steps=steps, guidance=guidance)
    rows = score_images(images, items_x, det, priors)
    gen_summary = _summarise(rows, items_x)
    # ceiling: real renders of the same prompts
    real = []
    for k, it in enumerate(items_x):
        kw = dict(object_class=it["class"], colour=it["colour"], split="train")
        kw.update(pattern=it["pattern"], part=it["part"]) if it["pattern"] else kw.update(pattern="none")
        real.append(render_scene(10_000_000 + 7919 * k + seed, size=backbone.resolution, **kw).image)
    real_summary = _summarise(score_images(real, items_x, det, priors), items_x)
    report = {"model": str(model_dir), "steps": steps, "guidance": guidance, "scheduler": "ddim", "seed": seed,
              "n_images": len(items_x), "generated": gen_summary, "real_renders": real_summary,
              "seconds": round(time.time() - t0, 1)}
    if out:
        from PIL import Image

        outp = Path(out)
        outp.mkdir(parents=True, exist_ok=True)
        (outp / "eval.json").write_text(json.dumps(report, indent=1))
        with open(outp / "eval_rows.jsonl", "w") as f:
            for it, r in zip(items_x, rows):
                f.write(json.dumps({**it, **r}) + "\n")
        # sheet: generated (top of each pair) and the detector's verdict as a coloured bar
        cells = []
        for img, r in zip(images, rows):
            ok = r.get("pattern_ok", r.get("plain_ok"))
            bar = np.zeros((4, img.shape[1], 3), np.uint8)
            bar[:] = (40, 200, 40) if ok else (220, 40, 40)
            cells.append(np.concatenate([img, bar]))
        cols = 12
        while len(cells) % cols:
            cells.append(np.full_like(cells[0], 255))
        rows_img = [np.concatenate(cells[i:i + cols], 1) for i in range(0, len(cells), cols)]
        Image.fromarray(np.concatenate(rows_img)).save(outp / "eval_sheet.png")
    return report
