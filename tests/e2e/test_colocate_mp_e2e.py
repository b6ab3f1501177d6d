"""``megatron-pz train`` with ``rollout.colocate=true`` on two ranks (tiny policy, gloo): TP2, and DP2 where the
second data owner reaches rank 0's in-process server over HTTP. It trains, resumes, writes nothing for the engine,
and samples what the disaggregated two-rank run (a separate server process, disk weight sync) samples.

Random-span with a reward that has variance, so every step's GRPO update moves the weights and a later step's
samples depend on the engine having received the update. Seeded rollouts (``rollout.reproducible``, the default).
"""
from pathlib import Path

import pytest
from test_colocate_e2e import responses
from test_resume_e2e import RS
from test_train_e2e import command, metrics, run

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]  # three two-rank runs per layout


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"], []], ids=["tp2", "dp2"])
def test_two_rank_colocated_run_trains_resumes_and_matches_the_disaggregated_run(tiny_policy, tmp_path, layout):
    colocated, disaggregated = tmp_path / "colocated", tmp_path / "disaggregated"
    run(command(colocated, tiny_policy, "train.steps=2", "rollout.colocate=true", *RS, *layout, nproc=2))
    p = run(command(colocated, tiny_policy, "train.steps=3", "rollout.colocate=true", *RS, *layout, nproc=2))
    assert "colocated on rank 0, weights copied in memory" in p.stdout
    run(command(disaggregated, tiny_policy, "train.steps=3", *RS, *layout, nproc=2))

    rows, ref = metrics(colocated), metrics(disaggregated)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    assert all(r["train/tokens"] > 0 and r["train/update_skipped"] == 0 for r in rows)
    for step in (1, 2, 3):
        got = responses(colocated, step)
        assert len({g for g, *_ in got}) == 4  # 2 paragraphs x 2 spans: both data owners' groups at DP2
        assert got == responses(disaggregated, step), f"step {step}"
    assert rows[0]["onpolicy/logprob_abs_diff_max"] < 1e-4 and rows[2]["onpolicy/logprob_abs_diff_max"] < 1e-4
    for a, b in zip(rows, ref):
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-3)
        assert a["time/sync"] > 0 and "time/sync_s_per_100m_params" in a
    assert not (Path(colocated) / "weights").exists()  # nothing written for the engine
    assert not (Path(colocated) / "rollout_server.log").exists()
