"""Statistics of benchmark comparisons: intervals of a mean or a rate, and paired tests between two methods run
on the same cases (the question is always "is A ahead of B on these cases?", so the test pairs them)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["wilson_interval", "paired_comparison", "sign_test_p"]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a rate (better than the normal interval near 0 and 1 and for small n)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability, with no difference between the methods, of a split of the
    non-tied cases at least as uneven as ``wins`` : ``losses`` (binomial, p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(a: Sequence[Optional[float]], b: Sequence[Optional[float]], n_boot: int = 10000,
                      seed: int = 0) -> dict:
    """A against B on the same cases: ``a[i]`` and ``b[i]`` are the two methods' scores on case ``i`` (cases where
    either is None are dropped). Returns the mean difference A - B with its 95% paired-bootstrap percentile
    interval (cases resampled with replacement, seeded), the wins / losses / ties, the two-sided sign-test p-value,
    and ``ahead``: True when the interval lies above 0 and the sign test rejects a tie at 5%, False when the
    interval lies below 0 and the sign test rejects at 5%, None otherwise (not separated)."""
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if x is not None and y is not None]
    n = len(pairs)
    if n == 0:
        return {"n": 0, "mean_a": None, "mean_b": None, "diff": None, "ci": None, "wins": 0, "losses": 0, "ties": 0,
                "sign_p": 1.0, "ahead": None}
    arr = np.asarray(pairs)
    d = arr[:, 0] - arr[:, 1]
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = sign_test_p(wins, losses)
    ahead = True if (lo > 0 and p < 0.05) else False if (hi < 0 and p < 0.05) else None
    return {"n": n, "mean_a": float(arr[:, 0].mean()), "mean_b": float(arr[:, 1].mean()), "diff": float(d.mean()),
            "ci": (lo, hi), "wins": wins, "losses": losses, "ties": n - wins - losses, "sign_p": p, "ahead": ahead}
