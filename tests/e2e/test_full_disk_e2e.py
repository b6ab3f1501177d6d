"""A full disk at a checkpoint through the real entry point: the run stops with one line naming the folder and the
OS error (exit status 2), the previous checkpoint stays current, and once there is space the same command resumes
and finishes. The disk "fills" by an injected ENOSPC on the shard files of one iteration (a ``sitecustomize``
module on the trainer's PYTHONPATH patches ``open`` there; the forked checkpoint writers inherit it)."""
import os
import subprocess

import pytest
from test_train_e2e import REPO, command, env, metrics, run

pytestmark = pytest.mark.multiproc

SITECUSTOMIZE = '''
import builtins, errno, os
_open = builtins.open
_full = os.environ.get("FULL_DISK_AT")

def _full_open(file, mode="r", *args, **kwargs):
    if _full and _full in str(file) and any(c in str(mode) for c in "wax"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return _open(file, mode, *args, **kwargs)

builtins.open = _full_open
'''


def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes(tiny_policy, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "run"
    cmd = command(out, tiny_policy, "train.steps=2", "train.objective=random_span",
                  "reward.pred_reward=plugin_rewards:odd_length")
    e = env()
    e.update(PYTHONPATH=os.pathsep.join([str(hook), e["PYTHONPATH"]]), FULL_DISK_AT=".iter_0000002.tmp")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=e, cwd=REPO)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-pz train: error: could not write checkpoint iter_0000002 to "), last
    assert str(out / "checkpoints" / ".iter_0000002.tmp") in last and "No space left on device" in last, last
    assert last.endswith("the tracker still names iteration 1: make room there (or fix the cause) and run the same "
                         "command again to resume"), last
    assert "Traceback" not in p.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert not list(ckpts.glob(".iter_*")) and not (ckpts / "iter_0000002").exists()
    run(cmd)  # space is back: the same command resumes from step 1 and finishes
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
