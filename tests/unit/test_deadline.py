"""train.exit_duration_mins: stop while another step and its checkpoint still fit the wall-clock budget."""
import pytest

from megatron_pz.config import load_config
from megatron_pz.errors import ConfigError
from megatron_pz.trainer.deadline import Deadline, any_rank


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def test_no_budget_never_stops():
    clock = Clock()
    d = Deadline(None, clock=clock)
    clock.t += 1e9
    assert not d.no_room_for_another_step(1e9)


def test_stops_when_one_more_step_and_two_saves_would_pass_the_budget():
    clock = Clock()
    d = Deadline(1.0, clock=clock)  # 60 s
    clock.t += 30  # set-up and a first step: 30 s used
    d.record(step_s=10.0, save_s=5.0)
    # another step (10) + this step's save (5) + the next one's (5) = 20: 30 + 20 = 50 <= 60, continue
    assert not d.no_room_for_another_step(current_step_s=8.0)
    clock.t += 11  # 41 + 20 = 61 > 60: stop now, while this step's save still fits
    assert d.no_room_for_another_step(current_step_s=8.0)


def test_the_step_in_progress_and_an_unseen_save_count_as_long_as_a_step():
    clock = Clock()
    d = Deadline(1.0, clock=clock)
    clock.t += 20
    # no step recorded, no save seen: the current step (14 s) stands in for both, 20 + 14 + 2 * 14 = 62 > 60
    assert d.no_room_for_another_step(current_step_s=14.0)
    assert not d.no_room_for_another_step(current_step_s=13.0)  # 20 + 13 + 26 = 59
    d.record(step_s=13.0, save_s=1.0)
    assert d.longest_step_s == 13.0 and d.longest_save_s == 1.0
    d.record(step_s=2.0)  # a shorter step without a save changes neither
    assert d.longest_step_s == 13.0 and d.longest_save_s == 1.0


def test_any_rank_without_a_process_group_is_the_flag():
    assert any_rank(True) and not any_rank(False)


def test_config_takes_minutes_and_refuses_nonpositive():
    assert load_config(None, ["train.exit_duration_mins=1.5"]).train.exit_duration_mins == 1.5
    assert load_config(None, ["train.exit_duration_mins=2"]).train.exit_duration_mins == 2
    assert load_config(None, []).train.exit_duration_mins is None
    with pytest.raises(ConfigError, match="train.exit_duration_mins must be > 0"):
        load_config(None, ["train.exit_duration_mins=0"])
