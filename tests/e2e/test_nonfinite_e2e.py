"""NaN in the loss through the real entry point: a run with a good checkpoint continues on a reward that makes
every advantage NaN. Each such step is skipped (nothing moves, ``train/nonfinite_skipped`` = 1), and
``train.max_nonfinite_steps`` of them in a row stop the run in one line (exit status 2) before the last one's
save. The checkpoint saved after the skipped step holds no update of it (the LR schedule did not advance) and the
same command resumes from it."""
import json
import subprocess

import pytest
from test_train_e2e import REPO, command, env, metrics, run

pytestmark = pytest.mark.multiproc
RS = ["train.objective=random_span"]


def test_nonfinite_steps_are_skipped_then_stop_the_run_with_the_last_checkpoint_current(tiny_policy, tmp_path):
    out = tmp_path / "run"
    run(command(out, tiny_policy, "train.steps=1", *RS, "reward.pred_reward=plugin_rewards:odd_length"))
    tracker = out / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text().strip() == "1"
    p = subprocess.run(command(out, tiny_policy, "train.steps=5", *RS, "reward.pred_reward=plugin_rewards:nan_reward",
                               "train.max_nonfinite_steps=2"),
                       capture_output=True, text=True, timeout=600, env=env(), cwd=REPO)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "steps 2-3 all had NaN or Inf in the loss or the gradients" in last, last
    assert "train.max_nonfinite_steps=2" in last and "Traceback" not in p.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]  # step 2 skipped and logged; step 3 stopped the run
    assert rows[0]["train/nonfinite_skipped"] == 0 and rows[0]["train/update_skipped"] == 0
    assert rows[1]["train/nonfinite_skipped"] == 1 and rows[1]["train/update_skipped"] == 1
    assert rows[1]["train/lr"] == rows[1]["train/lr"]  # the schedule's value, logged even for a skipped step
    # saved after step 2 (save_interval 1), not after step 3, which stopped the run; one real update in it
    assert tracker.read_text().strip() == "2" and not list((out / "checkpoints").glob(".iter_*"))
    meta = json.loads((out / "checkpoints" / "iter_0000002" / "megatron_pz.json").read_text())
    assert meta["step"] == 2 and meta["scheduler"]["num_steps"] == 1
    # back on a finite reward, the same command goes on from step 2
    run(command(out, tiny_policy, "train.steps=3", *RS, "reward.pred_reward=plugin_rewards:odd_length"))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and tracker.read_text().strip() == "3"
    assert rows[2]["train/nonfinite_skipped"] == 0 and rows[2]["train/update_skipped"] == 0
