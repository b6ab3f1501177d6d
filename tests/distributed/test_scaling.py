"""``megatron-pz scaling`` and ``megatron-pz plan`` on CPU: gloo worlds per point, planner verdicts, CSV + PNG."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pz.plan.archs import preset
from megatron_pz.scaling import sweep

REPO = Path(__file__).resolve().parents[2]


def megatron_pz(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_pz.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.multiproc
def test_sweep_measures_tp_pp_dp_and_rejects_invalid_layouts(tmp_path):
    out = tmp_path / "sweep"
    p = megatron_pz("scaling", "--model", "tiny", "--tp", "1,2,3", "--pp", "1,2", "--world-size", "2",
                    "--mbs", "1", "--seq-length", "128", "--prompt-length", "32", "--num-microbatches", "2",
                    "--steps", "1", "--warmup", "0", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    rows = {r["label"].split(" mbs")[0]: r for r in csv.DictReader(open(out / "scaling.csv"))}
    measured = {k: r for k, r in rows.items() if r["status"] == "ok"}
    reasons = {k: r["reason"] for k, r in rows.items()}
    assert set(measured) == {"TP1 PP1 DP2", "TP1 PP2 DP1", "TP2 PP1 DP1"}, reasons
    for label, r in measured.items():
        assert float(r["tokens_per_s_per_gpu"]) > 0 and float(r["step_time_s"]) > 0
        assert int(r["tokens_per_step"]) == 2 * 128 * (2 if "DP2" in label else 1) * 1  # DP x micro-batches x seq
        parts = float(r["fwd_bwd_s"]) + float(r["grad_sync_s"]) + float(r["optimizer_s"])
        assert parts == pytest.approx(float(r["step_time_s"]), rel=0.01)
        assert 0 < float(r["mfu"]) < 1 and r["peak_source"] == "measured fp32 matmul"
        # the planner's prediction is within 35% of the measured peak RSS growth (small run: fixed costs weigh more)
        assert abs(float(r["mem_pred_error_pct"])) < 35, (label, r["measured_peak_mem_gib"], r["pred_alloc_gib"])
    rejected = {k: r["reason"] for k, r in rows.items() if r["status"] == "rejected"}
    assert "num_attention_heads=8 is not divisible by tensor_model_parallel_size=3" in rejected["TP3 PP1 DP1"]
    assert "world size 2 is not divisible by TP x PP x CP = 4" in rejected["TP2 PP2 DP1"]
    assert (out / "scaling.png").stat().st_size > 10_000
    # --report rebuilds the same table from the saved points and results
    (out / "scaling.csv").unlink()
    assert megatron_pz("scaling", "--out", str(out), "--report").returncode == 0
    assert len(list(csv.DictReader(open(out / "scaling.csv")))) == len(rows)


def test_dry_run_plans_and_rejects_what_cannot_fit(tmp_path):
    spec = sweep.SweepSpec(arch=preset("qwen3-8b"), model="qwen3-8b", tp=[1, 2, 8], pp=[1], dp=[1], cp=[1], ep=[1],
                             micro_batch_size=[1], recompute=[None, "full"], world_size=8, seq_length=5632,
                             prompt_length=1536, dtype="bf16", gpu_memory_gib=80.0, on_gpu=True)
    rows = sweep.write_points(spec, tmp_path)
    by = {(r["tp"], r["recompute"]): r for r in rows}
    # 8.2B params at TP1: 2 + 4 B/param of weights and grads alone are 45.8 GiB; the logits of one 5632-token
    # sequence over 151936 rows are another 20.7 GiB -> rejected, and the reason says what dominates.
    assert by[(1, "none")]["status"] == "rejected" and "GiB" in by[(1, "none")]["reason"]
    assert by[(8, "full")]["status"] == "planned"
    runnable = sorted(p.name for p in (tmp_path / "points").glob("*.point.json"))
    assert len(runnable) == sum(r["status"] == "planned" for r in rows)


def test_plan_cli_verdicts():
    ok = megatron_pz("plan", "--config", "examples/quickstart_cpu.yaml", "--world-size", "2",
                     "train.paragraphs_per_step=2")
    assert ok.returncode == 0 and "VERDICT: OK" in ok.stdout, ok.stdout + ok.stderr[-2000:]
    assert "process groups  Megatron parallel_state on a fake 2-rank world: DP 2" in ok.stdout
    bad = megatron_pz("plan", "--config", "examples/quickstart_cpu.yaml", "--world-size", "6",
                      "parallel.tensor_model_parallel_size=2")
    assert bad.returncode == 1 and "VERDICT: FAIL" in bad.stdout
    assert "num_attention_heads=9 is not divisible by tensor_model_parallel_size=2" in bad.stdout
    assert "train.paragraphs_per_step=4 is not divisible by the data-parallel size 3" in bad.stdout


def test_plan_for_a_gpu_config_with_a_preset_architecture():
    from megatron_pz.plan.dry_run import validate

    gpu_run = ["model.dtype=bf16", "train.paragraphs_per_step=8", "model.recompute_granularity=full",
               "model.recompute_method=uniform", "model.recompute_num_layers=1"]
    report = validate("examples/quickstart_cpu.yaml", gpu_run, world_size=8, model="qwen3-4b", memory_gib=80.0,
                      fake_groups=False)
    text = report.text()
    assert report.ok, text
    assert "4.02B params (from qwen3-4b)" in text and "GPU target: Transformer Engine assumed" in text
    # Megatron's own TransformerConfig checks run too: full recompute without a method is refused.
    incomplete = validate("examples/quickstart_cpu.yaml", ["model.dtype=bf16", "model.recompute_granularity=full"],
                          world_size=4, model="qwen3-4b", fake_groups=False)
    assert [c.name for c in incomplete.checks if c.ok is False] == ["megatron config"]
    assert "recompute_method must be" in incomplete.text()
    tight = validate("examples/quickstart_cpu.yaml", ["model.dtype=bf16"], world_size=1, model="qwen3-4b",
                     memory_gib=40.0, fake_groups=False)
    assert not tight.ok and "memory" in [c.name for c in tight.checks if c.ok is False]
