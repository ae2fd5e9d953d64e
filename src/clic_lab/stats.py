"""Statistics of benchmark comparisons: intervals of a mean or a rate, and paired tests between two methods run
on the same cases (the question is always "is A ahead of B on these cases?", so the test pairs them)."""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["mean_ci", "t_quantile95", "wilson_interval", "paired_comparison", "sign_test_p"]


def _p_within(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom, in closed form for integer df (Abramowitz and
    Stegun 26.7.3-4): with theta = atan(t / sqrt(df)), a finite sum of powers of cos(theta)."""
    theta = math.atan(t / math.sqrt(df))
    c = math.cos(theta)
    j = df % 2                                        # odd df: cos^1, cos^3, ...; even: cos^0, cos^2, ...
    coef, power, total = 1.0, c if j else 1.0, 0.0
    while j <= df - 2:
        total += coef * power
        coef *= (j + 1) / (j + 2)
        power *= c * c
        j += 2
    return 2 / math.pi * (theta + math.sin(theta) * total) if df % 2 else math.sin(theta) * total


@functools.lru_cache(maxsize=None)
def t_quantile95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (12.706 for 1, 2.0096 for 49; 1.96
    only in the limit): bisection on :func:`_p_within`, exact to float precision; beyond 1000 degrees of freedom
    the Cornish-Fisher expansion (A&S 26.7.5), whose error there is below 1e-15."""
    if df > 1000:
        z = 1.959963984540054                         # the normal quantile
        g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
        return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _p_within(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def _t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n samples (n - 1 degrees of freedom)."""
    return t_quantile95(n - 1)


def mean_ci(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high) of the 95% t-interval of the mean; None without finite values; low = high = mean for one."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    n, mean = len(vals), sum(vals) / len(vals)
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = _t95(n) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


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
