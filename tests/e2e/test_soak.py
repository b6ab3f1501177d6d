"""The long-run soak: 300 steps of the tiny policy through the real entry point, overlap on, a save every 10 steps
(``python -m benchmarks.soak``; figures in docs/training.md). After 20 steps the trainer's and its server's resident
memory grows < 1 % per 100 steps, descriptors and threads do not climb, and checkpoints + weights stay bounded.
Step time is printed, never asserted."""
import json

import pytest

from benchmarks.soak import main

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_300_steps_hold_memory_descriptors_threads_and_disk(tmp_path, tiny_policy):
    rc = main(["--steps", "300", "--policy", str(tiny_policy), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["steps_judged"] == [21, 300]
    assert rc == 0, result
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("iter_*")) == ["iter_0000290",
                                                                                          "iter_0000300"]
