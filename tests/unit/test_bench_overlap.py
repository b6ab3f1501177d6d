"""benchmarks.overlap's figures from hand-made metrics rows (the harness runs training; this checks the arithmetic)."""
import pytest

from benchmarks.overlap import summarize_modes, table_rows
from megatron_pz.errors import UserError


def row(step, t, rollout, train, wait=0.0, sync=1.0, background=None, stale=None, mismatch=None):
    r = {"step": step, "time/step": t, "time/rollout": rollout, "time/train": train, "time/rollout_wait": wait,
         "time/sync": sync}
    if background is not None:
        r["time/rollout_background"] = background
    if stale is not None:
        r["rollout/staleness_mean"] = stale
    if mismatch is not None:
        r["train/mismatch_abs_mean"] = mismatch
    return r


def test_overlap_figures_leave_out_the_warmup_and_the_last_step():
    rows = {"on-policy": [row(1, 99, 50, 40), row(2, 20, 10, 9), row(3, 30, 14, 15, mismatch=1e-6),
                          row(4, 99, 50, 40)],
            "overlap": [row(1, 99, 50, 40, background=9, stale=0.0), row(2, 12, 0.5, 9, wait=1.5, background=8,
                                                                        stale=1.0),
                        row(3, 18, 0.5, 15, wait=1.5, background=10, stale=1.0, mismatch=3e-6),
                        row(4, 99, 0.5, 40, stale=1.0)]}
    s = summarize_modes(rows, warmup=1)
    assert s["on-policy"]["measured_steps"] == [2, 3] and s["overlap"]["measured_steps"] == [2, 3]
    assert s["on-policy"]["step_s"] == 25 and s["overlap"]["step_s"] == 15
    assert s["overlap"]["share"]["rollout_wait"] == pytest.approx(3 / 30)
    assert s["overlap"]["share"]["train"] == pytest.approx(24 / 30)
    assert s["overlap"]["rollout_background_s"] == 9  # (8 + 10) / 2
    assert s["overlap"]["staleness_mean"] == 1.0  # steps 2-4 (step 4 trains a batch from step 3)
    assert s["on-policy"]["staleness_mean"] == 0.0 and s["overlap"]["mismatch_abs_mean"] == 3e-6
    table = table_rows(s)
    assert ["step time / on-policy", "1", "0.600"] in table


def test_too_few_steps_is_a_user_error():
    with pytest.raises(UserError, match="raise --steps"):
        summarize_modes({"on-policy": [row(1, 1, 1, 1), row(2, 1, 1, 1)]}, warmup=1)
