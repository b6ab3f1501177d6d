"""The checkpointer's pure parts: when it saves, and RNG states that survive a JSON round trip."""
import json
import random
from pathlib import Path

import numpy as np
import torch

from megatron_pz.config import CheckpointConfig
from megatron_pz.trainer.checkpointer import Checkpointer, rng_state, set_rng_state


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
