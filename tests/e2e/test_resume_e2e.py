"""Stopping and continuing a run through the real entry point (tiny policy, embedded server): extending a finished
run, a wall-clock budget, and (slow) a kill -9 soak. Every run samples with per-sample seeds (rollout.reproducible,
the default), so a resumed step repeats the uninterrupted run's responses, not only its data."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_e2e import REPO, command, env, metrics, run

pytestmark = pytest.mark.multiproc
# Random-span with a reward that has variance: the GRPO update really runs, so the weights move every step.
RS = ["train.objective=random_span", "reward.pred_reward=plugin_rewards:odd_length", "logging.sample_interval=1",
      "logging.samples_per_log=1000"]


def data_order(out):
    return [json.loads(line) for line in (Path(out) / "data_order.jsonl").read_text().splitlines()]


def samples(out, step):
    """Every sample a step trained on, as dumped (group, span, response, reward, advantage, weight version)."""
    path = Path(out) / "samples" / f"step_{step:07d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in Path(folder).glob("*.safetensors") for k, v in load_file(f).items()}


def test_extending_a_finished_run_continues_the_lr_schedule(tiny_policy, tmp_path):
    out = tmp_path / "run"
    run(command(out, tiny_policy, "train.steps=2", *RS))
    before = weights(out / "weights" / "v00000002")
    p = run(command(out, tiny_policy, "train.steps=3", *RS))
    notice = [line for line in p.stderr.splitlines() if "LR schedule changed" in line]
    assert len(notice) == 1 and "lr_decay_steps 2 -> 3" in notice[0] and "after step 2" in notice[0], p.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # optim.lr 1e-6 (quickstart), cosine: the 2-step run used 1e-6 and 5e-7 (train/lr is the lr a step ran at);
    # step 3 continues over 3 steps from 2 done: 1e-6 * (1 + cos(2 pi / 3)) / 2 = 2.5e-7, not the old end's 0
    assert [r["train/lr"] for r in rows] == pytest.approx([1e-6, 5e-7, 2.5e-7], rel=1e-9)
    assert rows[2]["train/tokens"] > 0 and rows[2]["train/update_skipped"] == 0
    after = weights(out / "weights" / "v00000003")
    assert any(not torch.equal(before[k], after[k]) for k in before), "step 3 left every weight as it was"


def test_a_time_budget_stops_cleanly_and_the_rest_repeats_the_uninterrupted_run(tiny_policy, tmp_path):
    """train.exit_duration_mins far below one step: the run stops after step 1 with a checkpoint (not due by
    save_interval), exit status 0 and one console line; the same command then finishes, and every step (the
    resumed ones too) trained on the same paragraphs, spans and sampled responses as an uninterrupted run."""
    ref = tmp_path / "uninterrupted"
    run(command(ref, tiny_policy, "train.steps=3", *RS))
    out = tmp_path / "budget"
    p = run(command(out, tiny_policy, "train.steps=3", *RS, "checkpoint.save_interval=0",
                    "train.exit_duration_mins=0.001"))  # run() asserts exit status 0
    stops = [line for line in p.stdout.splitlines() if line.startswith("stop ")]
    assert len(stops) == 1, p.stdout
    assert "after step 1 of 3" in stops[0] and "train.exit_duration_mins=0.001" in stops[0]
    assert "checkpoint saved" in stops[0]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert [r["step"] for r in metrics(out)] == [1]
    run(command(out, tiny_policy, "train.steps=3", *RS))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert data_order(out) == data_order(ref)
    for step in (1, 2, 3):
        got, want = samples(out, step), samples(ref, step)
        assert len(got) == 16 and got == want, f"step {step} differs from the uninterrupted run"
        groups = {s["group_id"] for s in got}
        assert all(len({s["response_text"] for s in got if s["group_id"] == g}) > 1 for g in groups)  # seeded apart


# ---------------------------------------------------------------------------- kill -9 soak
SOAK_STEPS = 6
SOAK = [f"train.steps={SOAK_STEPS}", *RS, "checkpoint.keep_last=2"]
PHASES = ("rollout", "train", "save")
MARK = re.compile(r"step (\d+): (rollout|train|sync|save)$")


def _marks(log: Path, offset: int) -> list[tuple[int, str]]:
    """(step, phase) markers the trainer wrote to train.log after byte ``offset``."""
    if not log.exists():
        return []
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return [(int(m.group(1)), m.group(2)) for line in f if (m := MARK.search(line.rstrip()))]


def _saved_step(out: Path) -> int:
    tracker = out / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.exists() else 0


def _kill_in(out: Path, cmd: list[str], step: int, phase: str, rng: random.Random,
             timeout: float = 600) -> dict | None:
    """Start the trainer, wait until it enters ``phase`` of ``step``, SIGKILL its whole process group a random
    moment into it. Returns where it died (the last marker in train.log), whether a checkpoint write was torn
    (its temporary folder left behind), and the step it had resumed from; None if the run finished first."""
    log = out / "train.log"
    offset = log.stat().st_size if log.exists() else 0
    resumed_from = _saved_step(out)
    started = time.time()
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                assert proc.returncode == 0, f"trainer exited with {proc.returncode}"
                return None
            if (step, phase) in _marks(log, offset):
                # a random moment into the phase; a tiny model's step and checkpoint take a fraction of a second
                time.sleep({"rollout": rng.uniform(0.0, 0.3), "train": rng.uniform(0.0, 0.3)}.get(phase, 0.0))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                died_step, died_phase = _marks(log, offset)[-1]  # the phase in progress when it died
                tmp = out / "checkpoints" / f".iter_{died_step:07d}.tmp"
                torn = died_phase == "save" and tmp.exists() and tmp.stat().st_mtime >= started
                return {"step": died_step, "phase": died_phase, "torn_save": torn, "resumed_from": resumed_from}
            time.sleep(0.02)
        raise AssertionError(f"step {step} {phase} not reached in {timeout}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


@pytest.mark.slow
def test_kill9_soak_resumes_to_the_uninterrupted_run(tiny_policy, tmp_path):
    """SIGKILL the trainer (and its embedded server) several times, each time in a random phase of one of the next
    two steps after its last checkpoint, rerunning the same command each time; the result must be the
    uninterrupted run's: data order, spans and responses, one metrics line per step, loadable checkpoints.
    SOAK_KILLS and SOAK_SEED (environment) vary it. Figures in docs/training.md."""
    t0 = time.time()
    ref = tmp_path / "uninterrupted"
    run(command(ref, tiny_policy, *SOAK))
    t_ref = time.time() - t0
    out = tmp_path / "killed"
    cmd = command(out, tiny_policy, *SOAK)
    rng = random.Random(int(os.environ.get("SOAK_SEED", "0")))
    plan = [PHASES[i % len(PHASES)] for i in range(int(os.environ.get("SOAK_KILLS", "6")))]
    rng.shuffle(plan)
    kills = []
    for phase in plan:
        target = min(SOAK_STEPS, _saved_step(out) + rng.randint(1, 2))
        hit = _kill_in(out, cmd, target, phase, rng)
        if hit is None:
            break
        kills.append(hit)
    run(cmd)  # the same command finishes the run
    report = {"kills": kills, "uninterrupted_s": round(t_ref, 1), "soak_s": round(time.time() - t0 - t_ref, 1)}
    print("SOAK", json.dumps(report))
    (tmp_path / "soak.json").write_text(json.dumps(report))
    assert len(kills) >= 4 and {"rollout", "train", "save"} <= {k["phase"] for k in kills}, kills
    assert sum(k["resumed_from"] > 0 for k in kills) >= 3, kills  # killed runs that had resumed from a checkpoint
    assert [r["step"] for r in metrics(out)] == list(range(1, SOAK_STEPS + 1))  # each step logged once
    assert data_order(out) == data_order(ref)
    for step in range(1, SOAK_STEPS + 1):
        assert samples(out, step) == samples(ref, step), f"step {step}: spans or responses differ"
    _check_checkpoints_load(out, tmp_path)


def _check_checkpoints_load(out: Path, tmp_path: Path) -> None:
    """Every checkpoint left is whole and loads: converted to HF (``megatron-pz convert``), it holds exactly the
    weights that step published to the rollout server (weights/vNNNNNNN), whichever killed process wrote them."""
    from megatron_pz.checkpoint.validate import validate_files

    root = out / "checkpoints"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(SOAK_STEPS)
    iters = sorted(p for p in root.glob("iter_*") if p.is_dir())
    assert [int(p.name.removeprefix("iter_")) for p in iters] == [SOAK_STEPS - 1, SOAK_STEPS]  # keep_last=2
    for it in iters:
        validate_files(it)
        meta = json.loads((it / "megatron_pz.json").read_text())
        assert meta["step"] == int(it.name.removeprefix("iter_")) == meta["weight_version"]
        hf = tmp_path / f"hf_{it.name}"
        p = subprocess.run([sys.executable, "-m", "megatron_pz.cli", "convert", "--from", "mcore", "--to", "hf",
                            str(it), str(hf)], capture_output=True, text=True, timeout=600, env=env(), cwd=REPO,
                           check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        saved, served = weights(hf), weights(out / "weights" / f"v{meta['step']:08d}")
        common = set(saved) & set(served)
        assert len(common) >= len(served) - 1  # lm_head may be tied away
        assert all(torch.equal(saved[k], served[k]) for k in common), it
