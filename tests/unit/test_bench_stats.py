"""benchmarks.stats on hand-computed numbers."""
import math

import pytest

from benchmarks.stats import last_k_mean, overlap, t975, t_interval


def test_t_interval_hand_values():
    # xs = 1, 2, 3: mean 2, sd 1, half-width t_{0.975,2} * 1 / sqrt(3) = 4.303 / 1.7321 = 2.4843
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 2.48434, abs=1e-4) and hi == pytest.approx(2 + 2.48434, abs=1e-4)
    # xs = 0.2, 0.4: mean 0.3, sd 0.14142, half-width 12.706 * 0.14142 / 1.41421 = 1.2706
    m, lo, hi = t_interval([0.2, 0.4])
    assert m == pytest.approx(0.3) and hi - m == pytest.approx(1.2706, abs=1e-4)
    m, lo, hi = t_interval([0.5])
    assert m == 0.5 and math.isnan(lo) and math.isnan(hi)
    assert t_interval([0.7] * 4) == (pytest.approx(0.7), pytest.approx(0.7), pytest.approx(0.7))


def test_t975_table_and_limits():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042 and t975(200) == 1.96
    with pytest.raises(ValueError):
        t975(0)
    with pytest.raises(ValueError):
        t_interval([])


def test_last_k_mean_and_overlap():
    assert last_k_mean([0.1, 0.2, 0.3, 0.5], 2) == pytest.approx(0.4)
    assert last_k_mean([0.1, 0.3], 5) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        last_k_mean([], 1)
    assert overlap((0.0, 1.0), (1.0, 2.0)) and overlap((0.0, 3.0), (1.0, 2.0))
    assert not overlap((0.0, 0.9), (1.0, 2.0))
