"""Asynchronous checkpoint saves through the real entry point (tiny policy, embedded server, one process):
the next step runs while a checkpoint is written, the checkpoint is published only after its write, and a
kill -9 while a write is in flight leaves the previous checkpoint current and the run resumes to the
uninterrupted run. ``MEGATRON_PZ_CHECKPOINT_WRITE_DELAY_S`` makes the background writer sleep before writing,
so the write surely overlaps what the test needs it to overlap."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume_e2e import RS, data_order, samples, weights
from test_train_e2e import REPO, command, env, metrics, run

pytestmark = pytest.mark.multiproc
ASYNC = ["checkpoint.async_save=true", "checkpoint.save_interval=1"]
WRITE_DELAY_ENV = "MEGATRON_PZ_CHECKPOINT_WRITE_DELAY_S"  # megatron_pz.checkpoint.background.WRITE_DELAY_ENV


def _lines(out: Path) -> list[str]:
    return (out / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()


def _at(lines: list[str], text: str) -> int:
    """Index of the first line containing ``text`` (the test fails naming it when there is none)."""
    hits = [i for i, line in enumerate(lines) if text in line]
    assert hits, f"{text!r} not in train.log"
    return hits[0]


def _tracker(out: Path) -> str:
    return (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip()


def test_async_save_overlaps_the_next_step_and_publishes_after_the_write(tiny_policy, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(command(out, tiny_policy, "train.steps=2", *RS, *ASYNC), capture_output=True, text=True,
                       timeout=600, env={**env(), WRITE_DELAY_ENV: "5"}, cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    lines = _lines(out)
    # Step 2 started while checkpoint 1 was still being written (the writer sleeps 5 s first); checkpoint 1 was
    # published (tracker) only after its write, before checkpoint 2 started, and the run's last checkpoint before
    # the run ended.
    assert (_at(lines, "checkpoint iter_0000001: writing in the background") < _at(lines, "step 2: rollout")
            < _at(lines, "checkpoint iter_0000001: written in the background")
            < _at(lines, "checkpoint iter_0000002: writing in the background")
            < _at(lines, "checkpoint iter_0000002: written in the background"))
    assert _tracker(out) == "2" and not list((out / "checkpoints").glob(".iter_*"))
    assert sorted(p.name for p in (out / "checkpoints").glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    assert [r["step"] for r in metrics(out)] == [1, 2] and all("time/save" in r for r in metrics(out))


def test_kill9_during_an_async_save_keeps_the_previous_checkpoint_and_resumes_exactly(tiny_policy, tmp_path):
    """SIGKILL the trainer (its whole process group: the writer and the embedded server too) a random moment into
    the background write of checkpoint 2. Checkpoint 1 stays current and loads; the same command then finishes,
    and every step trained on the uninterrupted (synchronously saved) run's paragraphs, spans and responses; the
    checkpoint written in the background while step 4 trained holds exactly step 3's published weights."""
    steps = ["train.steps=4", *RS, "checkpoint.save_interval=1"]
    ref = tmp_path / "sync"
    run(command(ref, tiny_policy, *steps))
    out = tmp_path / "async"
    cmd = command(out, tiny_policy, *steps, "checkpoint.async_save=true")
    delay = 8.0
    proc = subprocess.Popen(cmd, env={**env(), WRITE_DELAY_ENV: str(delay)}, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    mark = "checkpoint iter_0000002: writing in the background"
    deadline = time.time() + 600
    try:
        while not ((out / "train.log").exists() and any(mark in line for line in _lines(out))):
            assert proc.poll() is None, f"trainer exited with {proc.returncode} before checkpoint 2"
            assert time.time() < deadline, "checkpoint 2 never started"
            time.sleep(0.02)
        time.sleep(random.Random(0).uniform(0.0, 2.0))  # well inside the writer's 8 s sleep, even under load
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    # It died with checkpoint 2 in flight: started, never published, its folder still the temporary one.
    lines = _lines(out)
    assert not any("checkpoint iter_0000002: written" in line for line in lines)
    assert _tracker(out) == "1"
    assert (out / "checkpoints" / ".iter_0000002.tmp").is_dir() and not (out / "checkpoints" / "iter_0000002").exists()
    from megatron_pz.checkpoint import resolve, validate_files

    info = resolve(out / "checkpoints")
    validate_files(info.iter_dir)
    assert info.iteration == 1 and info.meta["step"] == 1

    run(cmd)  # the same command, without the test's write delay: resumes from checkpoint 1 and finishes
    assert "resumed from" in "\n".join(_lines(out)[len(lines):])
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # each step logged once
    assert data_order(out) == data_order(ref)
    for step in range(1, 5):
        assert samples(out, step) == samples(ref, step), f"step {step}: spans or responses differ"
    assert _tracker(out) == "4" and not list((out / "checkpoints").glob(".iter_*"))
    hf = tmp_path / "hf_iter3"
    p = subprocess.run([sys.executable, "-m", "megatron_pz.cli", "convert", "--from", "mcore", "--to", "hf",
                        str(out / "checkpoints" / "iter_0000003"), str(hf)], capture_output=True, text=True,
                       timeout=600, env=env(), cwd=REPO, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    saved, served = weights(hf), weights(out / "weights" / "v00000003")
    common = set(saved) & set(served)
    assert len(common) >= len(served) - 1  # lm_head may be tied away
    assert all(torch.equal(saved[k], served[k]) for k in common)
    meta = json.loads((out / "checkpoints" / "iter_0000003" / "megatron_pz.json").read_text())
    assert meta["step"] == meta["weight_version"] == 3
