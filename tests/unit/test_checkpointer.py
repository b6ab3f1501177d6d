"""The checkpointer's pure parts: when it saves, and RNG states that survive a JSON round trip."""
import json
import random
from pathlib import Path

import numpy as np
import torch

from megatron_pz.config import CheckpointConfig
from megatron_pz.trainer.checkpointer import Checkpointer
from megatron_pz.trainer.rng import rng_state, set_rng_state


def test_due_at_interval_last_step_and_on_stop(tmp_path):
    c = Checkpointer(Path(tmp_path), CheckpointConfig(save_interval=3), total_steps=7)
    assert [s for s in range(1, 8) if c.due(s)] == [3, 6, 7]
    assert c.due(1, stop_requested=True)
    only_end = Checkpointer(Path(tmp_path), CheckpointConfig(save_interval=0), total_steps=5)
    assert [s for s in range(1, 6) if only_end.due(s)] == [5]


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


# ---------------------------------------------------------------------------- the LR schedule on resume
class _Groups:
    """What Megatron's scheduler needs of an optimizer: its parameter groups."""

    def __init__(self):
        self.param_groups = [{"lr": None, "weight_decay": None}]


def _scheduler(steps, **optim):
    from megatron_pz.config import OptimConfig
    from megatron_pz.trainer.optimizer import build_scheduler

    opt = _Groups()
    return opt, build_scheduler(opt, OptimConfig(lr=1e-3, **optim), steps)


def test_extending_a_finished_run_continues_the_schedule_to_the_new_total():
    opt, old = _scheduler(2)  # cosine over 2 steps: step 1 at lr, step 2 at lr/2, then min_lr = 0
    assert opt.param_groups[0]["lr"] == 1e-3
    old.step(increment=1)
    old.step(increment=1)
    assert opt.param_groups[0]["lr"] == 0.0
    saved = json.loads(json.dumps(old.state_dict()))

    from megatron_pz.trainer.optimizer import restore_scheduler

    opt, new = _scheduler(3)
    changed = restore_scheduler(new, saved)
    # step 3 of a cosine over 3 steps, after 2 done: 1e-3 * (1 + cos(2 pi / 3)) / 2 = 2.5e-4
    assert new.num_steps == 2 and abs(opt.param_groups[0]["lr"] - 2.5e-4) < 1e-12
    assert changed == ["lr_decay_steps 2 -> 3 (optim.lr_decay_steps (default train.steps))",
                       "wd_incr_steps 2 -> 3 (optim.lr_decay_steps (default train.steps))"]


def test_an_unchanged_schedule_resumes_where_it_was_and_reports_nothing():
    from megatron_pz.trainer.optimizer import restore_scheduler

    opt, old = _scheduler(4, lr_decay_style="linear")
    old.step(increment=1)
    opt, new = _scheduler(4, lr_decay_style="linear")
    assert restore_scheduler(new, old.state_dict()) == []
    assert new.num_steps == 1 and abs(opt.param_groups[0]["lr"] - 7.5e-4) < 1e-12  # 1e-3 * (1 - 1/4)


# ---------------------------------------------------------------------------- a mapping of stateful parts
class _Part:
    def __init__(self, **state):
        self.state, self.loaded = state, None

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, meta):
        self.loaded = {k: meta[k] for k in self.state}


def test_the_checkpoint_meta_is_the_step_and_each_parts_own_keys(tmp_path):
    a, b = _Part(scheduler={"num_steps": 3}), _Part(weight_version=3, corpus={"0": [1, 2]})
    c = Checkpointer(Path(tmp_path), CheckpointConfig(), total_steps=5, parts={"a": a, "b": b}, run_name="r")
    meta = c._meta(3)
    assert meta == {"step": 3, "run_name": "r", "scheduler": {"num_steps": 3}, "weight_version": 3,
                    "corpus": {"0": [1, 2]}}
    clash = Checkpointer(Path(tmp_path), CheckpointConfig(), total_steps=5, parts={"a": a, "b": _Part(scheduler=1)})
    import pytest

    with pytest.raises(RuntimeError, match=r"part 'b' writes keys \['scheduler'\]"):
        clash._meta(3)


def test_the_run_is_frozen():
    import dataclasses

    import pytest

    from megatron_pz.trainer.run import Run, StopRequest

    assert Run.__dataclass_params__.frozen
    run = Run(**{f.name: None for f in dataclasses.fields(Run) if f.name not in ("chat_template", "start_step", "stop")})
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.start_step = 3
    stop = run.stop  # the one thing a signal changes is owned by its own object
    assert isinstance(stop, StopRequest) and not stop.requested
    stop.set()
    assert run.stop.requested
