"""A rollout server the trainer launched dies mid-step (kill -9): it is restarted with the current weights, the step
is retried, and the run finishes every step, each logged once (tiny policy, embedded server, random-span).
That no restart is made where none applies (rollout.max_engine_restarts=0, external servers, a server that is up)
is tests/unit/test_engine_restart.py."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_train_e2e import REPO, command, env, metrics

pytestmark = pytest.mark.multiproc  # a guarantee CI keeps: ~60 s on 2 quiet cores, 120 s at load 12
RS = ["train.objective=random_span", "reward.pred_reward=plugin_rewards:odd_length", "rollout.max_retries=1",
      "train.steps=2"]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _server_pid(trainer_pid: int) -> int | None:
    """The embedded server the trainer launched: its child running ``serve-rollout``."""
    for kid in _children(trainer_pid):
        try:
            if b"serve-rollout" in Path(f"/proc/{kid}/cmdline").read_bytes():
                return kid
        except FileNotFoundError:
            continue
    return None


def _processes_mentioning(path: Path) -> list[int]:
    """Processes whose command line mentions ``path`` (a restarted server names its weight folder)."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and str(path).encode() in (p / "cmdline").read_bytes():
                found.append(int(p.name))
        except OSError:
            continue
    return found


def _start_and_kill_server_at(out: Path, cmd: list[str], marker: str, timeout: float = 300):
    """Start the trainer; once train.log shows ``marker``, SIGKILL its rollout server. Returns (trainer, pid)."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    log = out / "train.log"
    while time.time() < deadline:
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}"
        if log.exists() and marker in log.read_text(errors="replace"):
            pid = _server_pid(proc.pid)
            assert pid is not None, "no serve-rollout child of the trainer"
            os.kill(pid, signal.SIGKILL)
            return proc, pid
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{marker!r} not reached in {timeout}s")


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for the trainer (its whole process group is killed if it overruns); assert exit 0; return its stderr."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-4000:]
    return stderr


def test_a_launched_server_killed_mid_step_is_restarted_and_every_step_runs_once(tiny_policy, tmp_path):
    out = tmp_path / "run"
    # loss.mismatch=mis_token rides along: the masked-IS counts reach metrics.jsonl through the real step
    cmd = command(out, tiny_policy, *RS, "loss.mismatch=mis_token", "loss.mismatch_band=[0.5, 2.0]")
    proc, killed = _start_and_kill_server_at(out, cmd, "step 2: rollout")
    stderr = finish(proc)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]  # every step, each logged once
    assert [r["weight_version"] for r in rows] == [1, 2]
    assert "rollout/engine_restarts" not in rows[0] and rows[1]["rollout/engine_restarts"] == 1
    assert all(r["count/random_span"] == 16 for r in rows)
    # one console line for the one event, naming the server, its exit and the version it came back with
    restarts = [line for line in stderr.splitlines() if "restarting it" in line]
    assert len(restarts) == 1, stderr[-4000:]
    assert "died (exit code -9)" in restarts[0] and "weight version 1" in restarts[0], restarts
    log = (out / "train.log").read_text()
    assert log.count("restarting it with weight version") == 1
    # the new server started from version 1's folder: the weights the run was at when the old one died
    server_log = (out / "rollout_server.log").read_text()
    assert "v00000001" in server_log and "weights updated to version 2" in server_log, server_log[-3000:]
    assert not _processes_mentioning(out / "weights")  # the restarted server was stopped with the run (no leak)
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)
    trained = [r for r in rows if r.get("train/tokens", 0) > 0]
    assert trained, "no step had a trainable group"
    for r in trained:  # engine and trainer agree in fp32: no token leaves [0.5, 2]
        assert r["train/mis_masked_tokens"] == 0 and r["train/mis_masked_seq_frac"] == 0
        assert r["train/mis_seqs"] > 0 and r["train/mis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
