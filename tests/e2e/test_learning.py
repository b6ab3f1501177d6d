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
independent units. The main guard is the contrast between the two runs at the end: the positive run's last
``LAST_K`` steps must beat the negative control's by more than 3 standard errors (groups as units). Both runs start
from the same weights and prompts, so that contrast is what the sign of the reward did. Besides, the positive run must
itself rise from step 1 by more than ``MIN_RISE`` (not merely the control fall), and the control's true reward must
not rise by ``MAX_CONTROL_RISE``. An earlier version asked the positive run alone for a rise of 3 standard errors
from its 4 first-step groups: CI failed it on a run that learned (0.064 -> 0.229, se 0.056), because that standard
error rests on 4 values and run-to-run spread is large (last-2 rises of 0.18-0.48 over five runs, docs/learning.md).
The contrast has about twice the margin on the same runs. At 4 steps a CI run then failed the contrast on a run
that learned (positive 0.030 -> 0.527, control 0.049 -> 0.172: +0.233, se 0.108, needed 0.323): the test now runs
5 steps, so the positive run has one more step to pull away, and the control's criterion allows for its own noise.
"""
import json
import math
import statistics
import subprocess
from pathlib import Path

import pytest

from test_train_e2e import REPO, command, env

pytestmark = pytest.mark.multiproc
STEPS, LAST_K = 5, 2  # 5 steps since a CI run at 4 ended with the contrast at 2.2 se (below)
MIN_RISE = 0.05  # the positive run's own rise: it climbs, not only the control falls (smallest measured: 0.165)
MAX_CONTROL_RISE = 0.1  # the control's true reward starts near 0.05 and falls towards 0 (measured: -0.02, -0.04)
# ... or rose by chance: 0.049 -> 0.172 at step 4 in one run (rise +0.090, se 0.063), one group of 4 at 0.44
BREVITY = "megatron_pz.rewards.format:brevity"
LEARN = ["train.objective=random_span", "optim.lr=1e-4", f"train.steps={STEPS}",
         "rollout.pred_max_new_tokens=32", "logging.sample_interval=1", "logging.samples_per_log=16", "checkpoint.save_interval=0",
         "logging.tensorboard=false",
         # Unseeded, so that repeated runs on one tree are not all the same draw. Seeded (the trainer's default) it
         # passes too: test_reward_rises_seeded at three train.seed values, contrasts of 4-13 standard errors
         # (docs/learning.md; the sampler itself is checked by tests/unit/test_seeded_sampling_fit.py).
         "rollout.reproducible=false"]


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


def last(steps: list[list[float]]) -> list[float]:
    return [g for s in steps[-LAST_K:] for g in s]


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), its standard error), groups as the units (Welch)."""
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return statistics.fmean(a) - statistics.fmean(b), se


def rise(steps: list[list[float]]) -> tuple[float, float]:
    """Mean of the last LAST_K steps minus the mean of step 1, and its standard error."""
    return difference(last(steps), steps[0])


def learned(up: list[list[float]], down: list[list[float]]) -> bool:
    """The positive run ends above the control by > 3 standard errors, and rose itself by > MIN_RISE."""
    d, se = difference(last(up), last(down))
    return d > 3 * se and rise(up)[0] > MIN_RISE


def not_learned(steps: list[list[float]]) -> bool:
    """The negative control's test: its true reward did not rise, by more than MAX_CONTROL_RISE or than two of its
    standard errors, whichever is larger (a rise within its own noise is not a rise)."""
    d, se = rise(steps)
    return d < max(MAX_CONTROL_RISE, 2 * se)


def start(out: Path, reward: str, *extra: str, nproc: int = 1) -> subprocess.Popen:
    cmd = command(out, "smollm2", *LEARN, f"reward.pred_reward={reward}", *extra, nproc=nproc)
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, timeout: float = 900) -> None:
    log, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{log[-4000:]}"


def report(name: str, steps: list[list[float]]) -> str:
    d, se = rise(steps)
    return f"{name}: per-step mean {[round(statistics.fmean(s), 3) for s in steps]}, rise {d:+.3f} (se {se:.3f})"


def contrast(up: list[list[float]], down: list[list[float]]) -> str:
    d, se = difference(last(up), last(down))
    return f"last {LAST_K} steps, positive - control: {d:+.3f} (se {se:.3f}, needs > {3 * se:.3f})"


def test_criteria_on_hand_made_curves():
    """The assertions below can fail: flat, falling and swapped curves are refused (hand-made group means)."""
    rising = [[0.05, 0.10, 0.0, 0.08], [0.1, 0.2, 0.15, 0.1], [0.2, 0.3, 0.25, 0.35], [0.3, 0.4, 0.2, 0.35]]
    falling = [[0.05, 0.10, 0.0, 0.08], [0.04, 0.05, 0.0, 0.03], [0.0, 0.02, 0.01, 0.0], [0.0, 0.0, 0.01, 0.0]]
    flat = [[0.05, 0.10, 0.0, 0.08]] * 4
    assert learned(rising, falling) and not_learned(falling) and not_learned(flat)
    assert not learned(falling, rising)  # a sign bug: the control climbs, the positive run falls
    assert not learned(flat, flat)  # a lost gradient or stale weights
    assert not learned(flat, falling)  # only the control moved: the positive run must rise itself
    assert not not_learned(rising)


def test_reward_rises_and_flipped_sign_does_not(smollm2, tmp_path):
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    runs = [start(pos, BREVITY), start(neg, "plugin_rewards:neg_brevity")]  # one core each
    for p in runs:
        finish(p)
    up, down = curve(pos, 1.0), curve(neg, -1.0)
    summary = "\n".join([report("brevity", up), report("flipped", down), contrast(up, down)])
    print(summary)
    assert learned(up, down), summary
    assert not_learned(down), summary


def two_rank_run(tmp_path: Path, name: str, *layout: str) -> None:
    """The positive run on two ranks over gloo, against the single-rank negative control run at the same time (the
    three processes share the 2 cores)."""
    out, neg = tmp_path / name, tmp_path / "neg"
    runs = [start(out, BREVITY, *layout, nproc=2), start(neg, "plugin_rewards:neg_brevity")]
    for p in runs:
        finish(p, timeout=1500)
    up, down = curve(out, 1.0), curve(neg, -1.0)
    summary = "\n".join([report(f"brevity {name}", up), report("flipped", down), contrast(up, down)])
    print(summary)
    assert learned(up, down), summary


@pytest.mark.slow
def test_reward_rises_at_pp2(smollm2, tmp_path):
    """PP2 (SmolLM2 has 9 heads, so TP2 is impossible): the last stage computes the loss, the tied embedding's
    gradient is reduced across the stages, and the weight sync gathers the stages' shards."""
    two_rank_run(tmp_path, "pp2", "parallel.pipeline_model_parallel_size=2")


@pytest.mark.slow
def test_reward_rises_at_dp2(smollm2, tmp_path):
    """DP2: each rank's data owner collects one of the step's 2 paragraphs, the loss is normalised by the global
    token count and the distributed optimizer reduce-scatters the gradients (tests/distributed/
    test_gradient_parity_smollm2.py checks that gradient against one rank's on a fixed batch)."""
    two_rank_run(tmp_path, "dp2")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1234, 1, 2])
def test_reward_rises_seeded(smollm2, tmp_path, seed):
    """The same test with per-sample seeded sampling (``rollout.reproducible=true``, the trainer's default) at three
    ``train.seed`` values (1234 is the default). Both runs share the seed, so their step-1 samples are the same
    draws (same weights, same seeds); they part from step 2 on, as their updates differ. The sampler itself is
    checked by ``tests/unit/test_seeded_sampling_fit.py``; figures in docs/learning.md."""
    seeded = ["rollout.reproducible=true", f"train.seed={seed}"]
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    runs = [start(pos, BREVITY, *seeded), start(neg, "plugin_rewards:neg_brevity", *seeded)]  # one core each
    for p in runs:
        finish(p)
    up, down = curve(pos, 1.0), curve(neg, -1.0)
    summary = "\n".join([f"train.seed={seed}, seeded", report("brevity", up), report("flipped", down),
                         contrast(up, down)])
    print(summary)
    assert learned(up, down), summary
    assert not_learned(down), summary
