"""benchmarks.clients' arithmetic and answer checks on hand-made outcomes (the e2e test drives a real server)."""
import math

import pytest

from benchmarks.clients import Kind, Outcome, check_answer, percentile, summarize


def test_percentile_interpolates_between_order_statistics():
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.99) == pytest.approx(4.96)
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_an_answer_is_checked_against_what_was_asked():
    k = Kind("medium", 8, 3, 2)
    good = [{"meta_info": {"completion_tokens": 3}}] * 2
    assert check_answer(k, 200, good) is None
    assert check_answer(k, 503, good) == "status 503"
    assert check_answer(k, 200, good[:1]) == "1 items for n=2"
    assert "2 completion tokens" in check_answer(k, 200, [{"meta_info": {"completion_tokens": 2}}] * 2)
    assert check_answer(Kind("small", 4, 2, 1), 200, {"meta_info": {"completion_tokens": 2}}) is None


def test_summary_counts_statuses_and_applies_the_small_request_bound():
    outs = [Outcome("small", 200, s, None) for s in (0.1, 0.2, 0.3)] + [
        Outcome("large", 200, 2.0, None), Outcome("large", 502, 0.5, "status 502"), Outcome("small", 0, 9.0, "t/o")]
    s = summarize(outs, small_unloaded=[0.05, 0.04, 0.06], chunk_unloaded=[0.2])
    assert s["by_status"] == {"200": 4, "502": 1, "0": 1}
    assert s["server_errors"] == 1 and s["no_answer"] == 1 and s["wrong_answers"] == 2
    assert s["small_p99_bound_s"] == pytest.approx(5 * 0.05 + 0.2)
    assert s["per_kind"]["small"]["p99_s"] == pytest.approx(0.298)  # answered ones only: 0.1, 0.2, 0.3
    assert s["small_p99_within_bound"] is True
    s = summarize(outs, small_unloaded=[0.01], chunk_unloaded=[0.1])
    assert s["small_p99_within_bound"] is False
