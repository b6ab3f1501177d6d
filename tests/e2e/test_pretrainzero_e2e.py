"""A PretrainZero step that trains both tasks, and its rewards and advantages recomputed by hand from the logs.

``train.objective=pretrainzero`` through ``megatron-pz train`` on the tiny random policy: the trainer's own
collection (generator rollouts, span rules, predictor rollouts), rewards, generator reward, GRPO advantages, DAPO
filter and Megatron update. A random policy never writes a valid ``\\mask{}``, so the generator's response is
forced to start with one: ``prompt.gen_response_prefix=\\mask{the}`` (the last balanced ``\\mask{}`` is the span,
and the random continuation after it writes none). The span rules still decide: "the" must occur in the
paragraph, fewer than 8 times (as a substring), else the mask is invalid. Exact match would score every random
prediction 0 (every group filtered, nothing trained), so the predictor reward is the plug-in
``plugin_rewards:one_in_three`` (1 when the response's length in characters is a multiple of 3): it has variance,
and some masks' predictions all score 0, so Eq. 9's zero rule is exercised too.

Every sample is logged (``logging.samples_per_log`` above the step's count). From the logged samples alone the
test recomputes, independently of ``rewards/span.py`` and ``algo/advantages.py``:
  * the predictor rewards (the plug-in's rule on the logged response text);
  * the generator rewards [PZ Eq. 9]: r_gen = 1 - acc, 0 when acc = 0, with acc the mean reward of the mask's
    predictor group; an invalid mask gets ``reward.invalid_mask_reward`` (0);
  * the advantages [PZ Eq. 10] per group: A_i = (r_i - mean) / (std + eps) with the population std (ddof 0) and
    eps = 1e-6 (the paper leaves both open, docs/method.md §6 item 18; these are ``advantage``'s defaults), after
    the DAPO filter: a group whose rewards are all equal is FILTERED with advantage 0 [PZ §4.1];
and checks that the logged per-task trained tokens (``trained_tokens/<task>``) are the response tokens of the
unfiltered samples, add up to the step's loss tokens (``train/tokens``, counted by the Megatron step), and that both
tasks trained. The check can fail: the same logs with the sample std's advantages, with a generator rewarded 1 for
a mask its predictors never solved, or with a filtered group marked trained, are refused.
"""
import copy
import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from test_train_e2e import command, metrics, run

pytestmark = pytest.mark.multiproc
EPS = 1e-6
STEPS, PARAGRAPHS, MASKS, PREDICTIONS = 2, 2, 4, 4


def logged_samples(out: Path, step: int) -> list[dict]:
    return [json.loads(x) for x in (out / "samples" / f"step_{step:07d}.jsonl").read_text().splitlines() if x]


def by_group(samples: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        groups[s["group_id"]].append(s)
    return groups


def eq9(accuracy: float | None) -> float:
    """PretrainZero Eq. 9 with the zero-accuracy rule; None (an invalid mask) gets invalid_mask_reward = 0."""
    if accuracy is None or accuracy == 0.0:
        return 0.0
    return 1.0 - accuracy


def eq10(rewards: list[float], std=statistics.pstdev) -> list[float] | None:
    """PretrainZero Eq. 10 for one group; None when DAPO filters it (all rewards equal)."""
    if max(rewards) == min(rewards):
        return None
    mean, sd = statistics.fmean(rewards), std(rewards)
    return [(r - mean) / (sd + EPS) for r in rewards]


def check(rows: dict[int, dict], steps: dict[int, list[dict]]) -> dict[str, float]:
    """Every assertion of the module docstring on the logged metrics and samples; returns the trained tokens per
    task over the run."""
    trained: dict[str, float] = defaultdict(float)
    valid_masks = mixed_gen_groups = sample_std_differs = zero_accuracy = 0
    for step, samples in steps.items():
        row = rows[step]
        gen = [s for s in samples if s["task"] == "mask_gen"]
        pred = [s for s in samples if s["task"] == "mask_pred"]
        valid = sum(s["metadata"]["mask_valid"] for s in gen)
        assert len(gen) == row["count/mask_gen"] == PARAGRAPHS * MASKS
        assert len(pred) == row.get("count/mask_pred", 0) == PREDICTIONS * valid  # a group per valid mask
        assert all(s["status"] in ("completed", "truncated", "filtered") for s in samples)  # all generated
        # predictor rewards: the plug-in's rule on the logged response
        assert all(s["reward"] == float(len(s["response_text"]) % 3 == 0) for s in pred)
        accuracy = {g: statistics.fmean(s["reward"] for s in members) for g, members in by_group(pred).items()}
        zero_accuracy += sum(a == 0.0 for a in accuracy.values())
        # generator rewards: Eq. 9 from its mask's predictor group
        for s in gen:
            m = s["metadata"]
            assert m["mask_valid"] == (m["pred_group_id"] is not None) and m["response_prefix"] == "\\mask{the}"
            if m["mask_valid"]:
                assert m["span"] == "the" and 1 <= m["num_occurrences"] < 8
                valid_masks += 1
            assert s["reward"] == pytest.approx(eq9(accuracy[m["pred_group_id"]] if m["mask_valid"] else None),
                                                abs=1e-12), s["group_id"]
        # advantages: Eq. 10 per group, after the DAPO filter
        for group_id, members in by_group(samples).items():
            rewards = [s["reward"] for s in members]
            want = eq10(rewards)
            if want is None:
                assert all(s["status"] == "filtered" and s["advantage"] == 0.0 for s in members), group_id
                continue
            got = [s["advantage"] for s in members]
            assert all(s["status"] != "filtered" for s in members), group_id
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), group_id
            sample_std_differs += got != pytest.approx(eq10(rewards, statistics.stdev), rel=1e-6)  # ddof 0, not 1
            mixed_gen_groups += members[0]["task"] == "mask_gen"
        # trained tokens: the response tokens of the samples that kept an advantage, per task
        for task in ("mask_gen", "mask_pred"):
            mine = sum(s["response_tokens"] for s in samples if s["task"] == task and s["status"] != "filtered")
            assert row[f"trained_tokens/{task}"] == mine, (step, task)
            trained[task] += mine
        assert row["trained_tokens/mask_gen"] + row["trained_tokens/mask_pred"] == row["train/tokens"]
        if row["train/tokens"] > 0:  # the Megatron update ran
            assert row["train/update_skipped"] == 0 and row["train/grad_norm"] > 0
    # what the run must have shown (fixed seeds: a change of the draws that loses one says so here)
    assert valid_masks > 0 and mixed_gen_groups > 0 and sample_std_differs > 0 and zero_accuracy > 0, \
        (valid_masks, mixed_gen_groups, sample_std_differs, zero_accuracy)
    return trained


def test_a_pretrainzero_step_trains_both_tasks_with_hand_computed_advantages(tiny_policy, tmp_path):
    out = tmp_path / "run"
    run(command(out, tiny_policy, f"train.steps={STEPS}", "train.objective=pretrainzero",
                f"train.paragraphs_per_step={PARAGRAPHS}", f"train.masks_per_paragraph={MASKS}",
                f"train.predictions_per_mask={PREDICTIONS}",
                "prompt.gen_response_prefix=\\mask{the}", "reward.pred_reward=plugin_rewards:one_in_three",
                "logging.sample_interval=1", "logging.samples_per_log=1000", "checkpoint.save_interval=0"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["advantage"] == {**cfg["advantage"], "std_normalize": True, "ddof": 0, "eps": EPS, "dapo_filter": True}
    assert cfg["reward"]["invalid_mask_reward"] == 0.0 and cfg["reward"]["zero_acc_rule"] is True
    rows = {r["step"]: r for r in metrics(out)}
    assert sorted(rows) == list(range(1, STEPS + 1))
    steps = {step: logged_samples(out, step) for step in rows}
    trained = check(rows, steps)
    assert trained["mask_gen"] > 0 and trained["mask_pred"] > 0, dict(trained)

    # The hand computation can fail: the same logs with one thing changed are refused.
    def refused(change) -> bool:
        broken = copy.deepcopy(steps)
        change(broken)
        try:
            check(rows, broken)
        except AssertionError:
            return True
        return False

    def sample_std(steps):  # advantages with the sample std (ddof 1) instead of the population std
        for samples in steps.values():
            for members in by_group(samples).values():
                want = eq10([s["reward"] for s in members], statistics.stdev)
                for s, a in zip(members, want or [0.0] * len(members)):
                    s["advantage"] = a

    def no_zero_rule(steps):  # a generator whose predictors all failed rewarded 1 instead of 0
        for samples in steps.values():
            acc = {g: statistics.fmean(s["reward"] for s in m) for g, m in by_group(samples).items()}
            for s in samples:
                g = s["metadata"].get("pred_group_id")
                if s["task"] == "mask_gen" and g is not None and acc[g] == 0.0:
                    s["reward"] = 1.0

    def unfiltered(steps):  # an all-equal group trained with advantage 0 instead of filtered
        for samples in steps.values():
            for s in samples:
                if s["status"] == "filtered":
                    s["status"] = "completed"

    assert refused(sample_std) and refused(no_zero_rule) and refused(unfiltered)
