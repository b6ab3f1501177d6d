"""``benchmarks.saves``' figures from per-step metrics rows, with hand-computed numbers."""
import pytest

from benchmarks.saves import markdown, summarize_modes
from megatron_pz.errors import UserError


def _row(step, rollout, train, sync, save, **extra):
    return {"step": step, "time/rollout": rollout, "time/train": train, "time/sync": sync, "time/save": save,
            "time/step": rollout + train + sync + save + 1.0, **extra}


def test_shares_leave_out_the_warmup_and_the_last_step():
    rows = {
        # steps 2 and 3 are measured: step 1 is the warm-up, step 4's save is the run's last (waited for)
        "sync": [_row(1, 50, 9, 1, 9), _row(2, 10, 5, 1, 3), _row(3, 12, 6, 1, 5), _row(4, 10, 5, 1, 4)],
        "async": [_row(1, 50, 9, 1, 1), _row(2, 10, 5, 1, 0.5, **{"time/save_background": 3.0}),
                  _row(3, 12, 6, 1, 0.5, **{"time/save_background": 5.0}),
                  _row(4, 10, 5, 1, 4.5, **{"time/save_background": 7.0})],  # saves 3 and 4: 3 + 4 s
    }
    s = summarize_modes(rows, warmup=1)
    sync, asy = s["sync"], s["async"]
    assert sync["measured_steps"] == asy["measured_steps"] == [2, 3]
    # sync: steps of 20 s and 25 s; save 3 + 5 = 8 of 45 s
    assert sync["step_s"] == 22.5 and sync["save_s"] == 4.0
    assert sync["share"]["save"] == pytest.approx(8 / 45) and sync["share"]["rollout"] == pytest.approx(22 / 45)
    assert sync["background_write_s"] is None and sync["last_step_save_s"] == 4
    # async: steps of 17.5 s and 20.5 s; save 0.5 + 0.5 = 1 of 38 s; writers 3 + 5 + 7 = 15 s over 4 saves
    assert asy["step_s"] == 19.0 and asy["save_s"] == 0.5
    assert asy["share"]["save"] == pytest.approx(1 / 38)
    assert asy["background_write_s"] == 3.75 and asy["last_step_save_s"] == 4.5
    table = markdown(s)
    assert "| share: save | 17.8 % | 2.6 % |" in table and "| background write per save (s) | - | 3.75 |" in table


def test_too_few_steps_is_a_user_error():
    with pytest.raises(UserError, match="raise --steps"):
        summarize_modes({"sync": [_row(1, 1, 1, 1, 1), _row(2, 1, 1, 1, 1)]}, warmup=1)
