"""tools/experiment.py: the interval arithmetic behind docs/results.md."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from experiment import averaged, wilson  # noqa: E402


def test_wilson_by_hand():
    # k = 8, n = 48, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    p, n, z = 8 / 48, 48, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson(8, 48) == pytest.approx((centre - half, centre + half))
    assert wilson(8, 48) == pytest.approx((0.0870, 0.2958), abs=1e-4)
    assert wilson(0, 32)[0] == 0.0 and wilson(0, 32)[1] == pytest.approx(0.1072, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_distinct_spans_per_100_masks():
    from experiment import distinct_per_100

    assert distinct_per_100(["of", "of", "the", "of"]) == 50.0  # 2 distinct in 4
    assert distinct_per_100(["a", "b", "c"]) == 100.0
    assert math.isnan(distinct_per_100([]))


def test_seeds_pooled_per_item():
    a = [{"key": "x", "span": "Paris", "p": 0.2, "log_p": -1.0, "exact": 1.0, "nll": 10.0, "tokens": 5},
         {"key": "y", "span": "of", "p": 0.4, "log_p": -2.0, "exact": 0.0, "nll": 4.0, "tokens": 2}]
    b = [{**a[0], "p": 0.4, "exact": 0.0, "nll": 12.0}, {**a[1], "p": 0.0, "log_p": -4.0}]
    pooled = {r["key"]: r for r in averaged([a, b])}
    assert pooled["x"]["p"] == pytest.approx(0.3) and pooled["x"]["exact"] == 0.5 and pooled["x"]["nll"] == 11.0
    assert pooled["y"]["log_p"] == -3.0 and pooled["y"]["tokens"] == 2 and pooled["y"]["span"] == "of"
