"""Interval estimates over seeds (pure): the learning cross-check reports mean reward with a 95% t-interval."""
from __future__ import annotations

import math
from collections.abc import Sequence

# Student t quantiles t_{0.975, df} for df = 1..30 (two-sided 95%); beyond 30 the normal 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom (``df`` >= 1)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def t_interval(xs: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t-interval for the mean of ``xs``; one value gives (x, nan, nan).

    Seeds are the independent units (a run's steps are not), so ``xs`` holds one figure per seed.
    """
    n = len(xs)
    if n == 0:
        raise ValueError("t_interval of no values")
    m = sum(xs) / n
    if n == 1:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = t975(n - 1) * sd / math.sqrt(n)
    return m, m - h, m + h


def last_k_mean(curve: Sequence[float], k: int) -> float:
    """Mean of the last ``k`` values of a per-step reward curve (all of it when shorter)."""
    if k < 1 or not curve:
        raise ValueError(f"last_k_mean needs k >= 1 and a non-empty curve (k={k}, {len(curve)} values)")
    tail = list(curve)[-k:]
    return sum(tail) / len(tail)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the intervals [a0, a1] and [b0, b1] share a point."""
    return max(a[0], b[0]) <= min(a[1], b[1])
