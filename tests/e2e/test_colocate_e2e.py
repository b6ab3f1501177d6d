"""``megatron-pz train`` with ``rollout.colocate=true`` (tiny policy, TP1, one process): it trains, resumes, and
samples what the disaggregated run (a separate server process, disk weight sync) samples, step for step.

Random-span with a reward that has variance, so every step's GRPO update moves the weights and a later step's
samples depend on the engine having followed the update. Seeded rollouts (``rollout.reproducible``, the default).
"""
from pathlib import Path

import pytest
from test_resume_e2e import RS, samples
from test_train_e2e import command, metrics, run

pytestmark = pytest.mark.multiproc  # a guarantee CI keeps; three runs: about 95 s on 2 quiet cores


def responses(out, step):
    return [(s["group_id"], s["prompt_text"], s["response_text"], s["reward"], s["weight_version"])
            for s in samples(out, step)]


def test_colocated_run_trains_resumes_and_matches_the_disaggregated_run(tiny_policy, tmp_path):
    colocated, disaggregated = tmp_path / "colocated", tmp_path / "disaggregated"
    run(command(colocated, tiny_policy, "train.steps=2", "rollout.colocate=true", *RS))
    p = run(command(colocated, tiny_policy, "train.steps=3", "rollout.colocate=true", *RS))  # resumes at step 2
    assert "colocated, weights shared with the trainer" in p.stdout
    run(command(disaggregated, tiny_policy, "train.steps=3", *RS))

    rows, ref = metrics(colocated), metrics(disaggregated)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    assert all(r["train/tokens"] > 0 and r["train/update_skipped"] == 0 for r in rows)
    for step in (1, 2, 3):
        assert responses(colocated, step) == responses(disaggregated, step), f"step {step}"
    # the trainer's log-probs are the engine's on-policy (checked at each process's first step: 1 and 3)
    assert rows[0]["onpolicy/logprob_abs_diff_max"] < 1e-4 and rows[2]["onpolicy/logprob_abs_diff_max"] < 1e-4
    # the same update (the loss itself is ~1e-6 on-policy, noise; the gradient norm is not): the engines' log-probs
    # of the same tokens may differ in the last bits (batch composition), nothing more
    for a, b in zip(rows, ref):
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-3)
    assert not (Path(colocated) / "weights").exists()  # nothing written for the engine
    assert not (Path(colocated) / "rollout_server.log").exists()
