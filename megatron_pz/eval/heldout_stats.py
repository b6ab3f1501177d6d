"""Statistics of held-out records (``megatron-pz heldout`` JSON): paired differences and a cluster bootstrap.

Pure Python, no I/O but ``load_records``. Items are matched by their key (the paragraph id) and must carry the
same span in both record sets (same data, seed and layout). Paragraphs of one article are not independent, so
the 95 % interval resamples articles (clusters) with replacement: each resample's statistic is the ratio
sum(values) / sum(weights) over the items of the drawn articles (weights 1: the item mean; the token counts:
the per-token NLL), and the interval is the percentile interval of ``n_boot`` resamples. ``scale`` divides the
estimate and both ends (e.g. a difference expressed per unit of something).
"""
from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS = {"p": None, "log_p": None, "exact": None, "nll": "tokens"}
"""Metric -> the field that weights it (``nll`` is summed per item: its mean per token weights by ``tokens``)."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text(encoding="utf-8"))["records"]


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int  # items
    clusters: int  # articles


def paired(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], field: str,
           weight: str | None = None) -> tuple[list[float], list[float], list[str]]:
    """(b - a per item, weights, articles), items matched by ``key``; ValueError if the item sets differ."""
    ia, ib = {r["key"]: r for r in a}, {r["key"]: r for r in b}
    if len(ia) != len(a) or len(ib) != len(b):
        raise ValueError("duplicate item keys in a record set")
    if ia.keys() != ib.keys():
        raise ValueError(f"the record sets hold different items: {len(ia.keys() - ib.keys())} only in the first, "
                         f"{len(ib.keys() - ia.keys())} only in the second (same --data, --seed, --items?)")
    diffs, weights, articles = [], [], []
    for k, ra in ia.items():
        rb = ib[k]
        if ra.get("span") != rb.get("span"):
            raise ValueError(f"item {k}: span {ra.get('span')!r} vs {rb.get('span')!r} (different seeds or layouts)")
        if weight is not None and ra[weight] != rb[weight]:
            raise ValueError(f"item {k}: {weight} {ra[weight]} vs {rb[weight]} (different tokenizers?)")
        diffs.append(float(rb[field]) - float(ra[field]))
        weights.append(1.0 if weight is None else float(ra[weight]))
        articles.append(ra["article"])
    return diffs, weights, articles


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[Any], weights: Sequence[float] | None = None,
                      n_boot: int = 10_000, seed: int = 0, level: float = 0.95, scale: float = 1.0) -> Interval:
    """sum(values) / sum(weights) and its percentile ``level`` interval over resampled clusters, divided by
    ``scale``."""
    if not values or len(values) != len(clusters) or (weights is not None and len(weights) != len(values)):
        raise ValueError("values, clusters (and weights) must be non-empty and of one length")
    if not 0 < level < 1 or n_boot < 1 or scale == 0:
        raise ValueError(f"level {level} must be in (0, 1), n_boot {n_boot} >= 1, scale non-zero")
    w = [1.0] * len(values) if weights is None else list(weights)
    sums: dict[Any, list[float]] = {}
    for v, c, x in zip(values, clusters, w):
        s = sums.setdefault(c, [0.0, 0.0])
        s[0] += v
        s[1] += x
    num, den = [s[0] for s in sums.values()], [s[1] for s in sums.values()]
    k = len(num)
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        pick = rng.choices(range(k), k=k)
        d = sum(den[i] for i in pick)
        stats.append(sum(num[i] for i in pick) / d if d else float("nan"))
    stats.sort()
    tail = (1 - level) / 2
    return Interval(estimate=sum(num) / sum(den) / scale, low=_quantile(stats, tail) / scale,
                    high=_quantile(stats, 1 - tail) / scale, n=len(values), clusters=k)


def compare(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], field: str, n_boot: int = 10_000,
            seed: int = 0, scale: float = 1.0) -> Interval:
    """Paired difference b - a of a metric (``WEIGHTS``: per item, or per token for ``nll``), with the cluster
    bootstrap interval over articles."""
    if field not in WEIGHTS:
        raise ValueError(f"unknown metric {field!r}: expected one of {sorted(WEIGHTS)}")
    diffs, weights, articles = paired(a, b, field, WEIGHTS[field])
    return cluster_bootstrap(diffs, articles, weights, n_boot=n_boot, seed=seed, scale=scale)
