"""The loop learns: ``megatron-pz train`` raises a reachable reward, and the same run with the advantage sign
flipped does not.

Through the real entry point (embedded rollout server, disk weight sync, Megatron step) on SmolLM2-135M-Instruct
(the quickstart's model; the tiny random policy of conftest did not move in 8 steps at lr 1e-3 or 1e-2),
``train.objective=random_span``, fresh prompts each step (the corpus advances). The reward is ``brevity``
(rewards/format.py: 1 - characters / 128), given by dotted path as a plug-in is: dense, so every GRPO group has
variance and trains, and reachable, since stopping early or choosing shorter words is within one step's reach. A
sign error in the advantage or loss, a lost gradient or a weight sync that serves stale weights would each leave
it flat.

The negative control trains on the plug-in ``plugin_rewards:neg_brevity`` (minus the reward). GRPO advantages
are odd in the reward (A(-r) = -A(r)), so this is the positive run with the advantage sign flipped, without a test-only knob
in the product; its true reward (minus the logged one) must not rise. Both runs see the same prompts (same seed)
and run at the same time, one core each.

Margin: a step's mean over 4 prompt groups of 4 samples. Samples of a group share a prompt, so the groups are the
independent units; the test measures the spread of the group means of the first step and requires a rise of
at least 3 standard errors of the difference and of at least ``MIN_RISE``. Measured curves are in
docs/learning.md: at lr 5e-5 one run rose 0.08 -> 0.33 in 5 steps but another only 0.10 -> 0.18 in 4 (this test
failed on it: rise 0.03, se 0.05), so the test uses lr 1e-4.
"""
import json
import math
import statistics
import subprocess
from pathlib import Path

import pytest

from test_train_e2e import REPO, command, env

pytestmark = pytest.mark.multiproc
STEPS, LAST_K = 4, 2
MIN_RISE = 0.1  # about 2.5 x the standard error of the first-step mean measured by hand (group-mean sd ~0.08)
BREVITY = "megatron_pz.rewards.format:brevity"
LEARN = ["train.objective=random_span", "optim.lr=1e-4", f"train.steps={STEPS}",
         "rollout.pred_max_new_tokens=32", "logging.sample_interval=1", "logging.samples_per_log=16", "checkpoint.save_interval=0",
         "logging.tensorboard=false"]


def group_means(out: Path, step: int) -> list[float]:
    """Mean reward of each prompt group of one step, from the logged samples (all 16 are logged)."""
    rows = [json.loads(x) for x in (out / "samples" / f"step_{step:07d}.jsonl").read_text().splitlines() if x]
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["reward"] is not None:
            by.setdefault(r["group_id"], []).append(r["reward"])
    return [sum(v) / len(v) for v in by.values()]


def curve(out: Path, sign: float) -> list[list[float]]:
    """Per step, the group means of the true reward (``sign`` undoes the negative control's minus)."""
    return [[sign * g for g in group_means(out, s)] for s in range(1, STEPS + 1)]


def rise(steps: list[list[float]]) -> tuple[float, float]:
    """(mean of the last LAST_K steps - mean of the first step, standard error of that difference over groups)."""
    first, last = steps[0], [g for s in steps[-LAST_K:] for g in s]
    se = math.sqrt(statistics.variance(first) / len(first) + statistics.variance(last) / len(last))
    return statistics.fmean(last) - statistics.fmean(first), se


def learned(steps: list[list[float]]) -> bool:
    d, se = rise(steps)
    return d > max(MIN_RISE, 3 * se)


def not_learned(steps: list[list[float]]) -> bool:
    """The negative control's test: the true reward did not rise by the positive run's minimum."""
    return rise(steps)[0] < MIN_RISE


def start(out: Path, reward: str, *extra: str, nproc: int = 1) -> subprocess.Popen:
    cmd = command(out, "smollm2", *LEARN, f"reward.pred_reward={reward}", *extra, nproc=nproc)
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, timeout: float = 900) -> None:
    log, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{log[-4000:]}"


def report(name: str, steps: list[list[float]]) -> str:
    d, se = rise(steps)
    return f"{name}: per-step mean {[round(statistics.fmean(s), 3) for s in steps]}, rise {d:+.3f} (se {se:.3f})"


def test_reward_rises_and_flipped_sign_does_not(smollm2, tmp_path):
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    runs = [start(pos, BREVITY), start(neg, "plugin_rewards:neg_brevity")]  # one core each
    for p in runs:
        finish(p)
    up, down = curve(pos, 1.0), curve(neg, -1.0)
    print(report("brevity", up), report("flipped", down), sep="\n")
    assert learned(up), report("brevity", up)
    assert not_learned(down), report("flipped", down)
    # the negative control's assertion can fail: on a curve that learned (what a sign bug would give the flipped
    # run) it does fail
    assert not not_learned(up)


@pytest.mark.slow
def test_reward_rises_at_pp2(smollm2, tmp_path):
    """Two ranks over gloo: PP2 (SmolLM2 has 9 heads, so TP2 is impossible); gathers PP shards for the sync."""
    out = tmp_path / "pp2"
    finish(start(out, BREVITY, "parallel.pipeline_model_parallel_size=2", nproc=2), timeout=1500)
    up = curve(out, 1.0)
    print(report("brevity pp2", up))
    assert learned(up), report("brevity pp2", up)
