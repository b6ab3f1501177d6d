"""tools/experiment.py: the interval arithmetic behind docs/results.md."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from experiment import bootstrap, wilson  # noqa: E402


def test_wilson_by_hand():
    # k = 8, n = 48, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    p, n, z = 8 / 48, 48, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson(8, 48) == pytest.approx((centre - half, centre + half))
    assert wilson(8, 48) == pytest.approx((0.0870, 0.2958), abs=1e-4)
    assert wilson(0, 32)[0] == 0.0 and wilson(0, 32)[1] == pytest.approx(0.1072, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_bootstrap_over_seeds_and_items():
    assert bootstrap([[1.0] * 10, [1.0] * 10]) == (1.0, 1.0, 1.0)  # no spread, no interval
    mean, lo, hi = bootstrap([[0.0, 1.0] * 32] * 3)
    assert mean == 0.5 and lo < 0.5 < hi and hi - lo < 0.3
    # seeds that disagree widen the interval beyond what the items alone give
    _, lo1, hi1 = bootstrap([[0.0, 1.0] * 32] * 3)
    _, lo2, hi2 = bootstrap([[0.0] * 64, [0.0, 1.0] * 32, [1.0] * 64])
    assert hi2 - lo2 > 2 * (hi1 - lo1)
