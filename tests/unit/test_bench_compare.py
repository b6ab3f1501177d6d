"""``benchmarks.compare`` arithmetic on hand-made measurements: reductions, ratios, tables (no model, no TRL run)."""
import math
import sys

import pytest

from benchmarks import compare, procs, report
from megatron_pz.errors import UserError


def _metrics_row(step, rollout, train, sync, save, extra_idle=0.0, n=16, length=10.0, tokens=2000.0):
    total = rollout + train + sync + save + extra_idle
    return {"step": step, "time/rollout": rollout, "time/train": train, "time/sync": sync, "time/save": save,
            "time/step": total, "count/random_span": n, "length/random_span_mean": length,
            "throughput/tokens_per_s": tokens / total if total else 0.0, "train/tokens": n * length}


def test_ours_steps_reads_phases_tokens_and_idle():
    rows = report.ours_steps([_metrics_row(1, 4.0, 2.0, 0.5, 0.0, extra_idle=1.5)])
    r = rows[0]
    assert r["step_s"] == pytest.approx(8.0) and r["step_no_save_s"] == pytest.approx(8.0)
    assert r["idle_s"] == pytest.approx(1.5)
    assert r["generated_tokens"] == pytest.approx(160.0)
    assert r["trained_tokens"] == pytest.approx(2000.0)


def test_with_overlap_the_rollout_time_is_the_previous_steps_background_rollout():
    # rollout.max_staleness=1: step 2's batch was generated during step 1 (9 s in the background), step 3's during
    # step 2 (11 s); their rollout phases only take the ready batch (0.1 s)
    rows = [_metrics_row(1, 20.0, 2.0, 0.5, 0.0) | {"time/rollout_background": 9.0},
            _metrics_row(2, 0.1, 2.0, 0.5, 0.0) | {"time/rollout_background": 11.0},
            _metrics_row(3, 0.1, 2.0, 0.5, 0.0)]
    steps = report.ours_steps(rows)
    assert [r["generating_s"] for r in steps] == pytest.approx([20.0, 9.1, 11.1])
    assert [r["rollout_s"] for r in steps] == pytest.approx([20.0, 0.1, 0.1])  # the phase, for the step's shares
    s = report.summarize(steps, None, None, warmup=1, params=1, matmul_gflops=1.0, peak_rss={})
    assert s["ours"]["rollout_tokens_per_s"] == pytest.approx(320 / 20.2)  # 2 x 160 tokens over 9.1 + 11.1 s


def _hand_made():
    ours = report.ours_steps([_metrics_row(1, 40.0, 10.0, 1.0, 0.0, extra_idle=5.0),  # warm-up, left out
                               _metrics_row(2, 4.0, 2.0, 1.0, 3.0),
                               _metrics_row(3, 6.0, 2.0, 1.0, 0.0)])
    trl = [{"step_s": 99.0, "rollout_s": 50.0, "train_s": 49.0, "generated_tokens": 160, "trained_tokens": 2000},
           {"step_s": 10.0, "rollout_s": 8.0, "train_s": 2.0, "generated_tokens": 160, "trained_tokens": 2000},
           {"step_s": 14.0, "rollout_s": 12.0, "train_s": 2.0, "generated_tokens": 160, "trained_tokens": 2000}]
    gen = [{"generate_s": 9.0, "generated_tokens": 160}, {"generate_s": 2.0, "generated_tokens": 160},
           {"generate_s": 2.0, "generated_tokens": 160}]
    return report.summarize(ours, trl, gen, warmup=1, params=1_000_000, matmul_gflops=10.0,
                             peak_rss={"ours": 3_000_000_000, "trl": 2_000_000_000, "generate": 10})


def test_summarize_ratios_come_from_the_measured_values():
    s = _hand_made()
    o, t, r = s["ours"], s["trl"], s["ratio_ours_over_trl"]
    # ours: step without save = (7 + 9) / 2; rollout 320 tokens / 10 s; train 4000 tokens / 4 s
    assert o["step_s"] == pytest.approx(8.0) and o["step_with_save_s"] == pytest.approx(9.5)
    assert o["rollout_tokens_per_s"] == pytest.approx(32.0)
    assert o["train_tokens_per_s"] == pytest.approx(1000.0)
    assert t["step_s"] == pytest.approx(12.0)
    assert t["rollout_tokens_per_s"] == pytest.approx(16.0) and t["train_tokens_per_s"] == pytest.approx(1000.0)
    assert r["step_s"] == pytest.approx(8.0 / 12.0)
    assert r["rollout_tokens_per_s"] == pytest.approx(2.0)
    assert r["train_tokens_per_s"] == pytest.approx(1.0)
    assert r["peak_rss_bytes"] == pytest.approx(1.5)
    # 6 N T / train time over the measured matmul rate
    assert o["train_flops_per_s"] == pytest.approx(6 * 1e6 * 4000 / 4.0)
    assert o["train_flops_over_matmul"] == pytest.approx(6e9 / 10e9)
    assert s["generate"]["tokens_per_s"] == pytest.approx(80.0)
    assert o["rollout_over_generate"] == pytest.approx(32.0 / 80.0)
    assert o["sync_s"] == pytest.approx(1.0)
    # shares of the step (save included): rollout 10 / 19, save 3 / 19, idle 0; they sum to 1
    assert o["share"]["rollout"] == pytest.approx(10 / 19) and o["share"]["save"] == pytest.approx(3 / 19)
    assert sum(o["share"].values()) == pytest.approx(1.0)


def test_train_flops_are_the_executed_ones_when_the_trainer_logs_them():
    rows = [_metrics_row(1, 4.0, 2.0, 1.0, 0.0), _metrics_row(2, 4.0, 2.0, 1.0, 0.0),
            _metrics_row(3, 4.0, 6.0, 1.0, 0.0)]
    rows[1]["train/flops"], rows[2]["train/flops"] = 3e9, 5e9  # the warm-up row has none: not measured
    s = report.summarize(report.ours_steps(rows), None, None, warmup=1, params=1_000_000, matmul_gflops=10.0,
                         peak_rss={})
    # (3 + 5) GFLOP over 2 + 6 s of train phase, whatever the (unshared) token count says
    assert s["ours"]["train_flops_source"] == "executed"
    assert s["ours"]["train_flops_per_s"] == pytest.approx(1e9)
    assert s["ours"]["train_flops_over_matmul"] == pytest.approx(0.1)
    assert "shared prompts once" in report.text_table(s)
    # a measured row without train/flops (an older run): the 6NT rule for all of them
    del rows[2]["train/flops"]
    s = report.summarize(report.ours_steps(rows), None, None, warmup=1, params=1_000_000, matmul_gflops=10.0,
                         peak_rss={})
    assert s["ours"]["train_flops_source"] == "6NT"
    assert s["ours"]["train_flops_per_s"] == pytest.approx(6 * 1e6 * 4000 / 8.0)


def test_tables_have_every_column_and_row():
    s = _hand_made()
    text, md = report.text_table(s), report.markdown_table(s)
    for out in (text, md):
        for word in ("megatron_pz", "TRL GRPOTrainer", "ours / TRL", "step time", "rollout tokens/s",
                     "train tokens/s", "peak memory", "FLOP/s", "plain transformers generate", "weight sync",
                     "rollout", "train", "sync", "save", "idle"):
            assert word in out, word
    assert "0.67" in md and "2.00" in md and "1.50" in md  # the ratios
    assert md.splitlines()[1] == "|---|---|---|---|"


def test_without_trl_side_the_table_says_so():
    s = report.summarize(report.ours_steps([_metrics_row(1, 1, 1, 1, 0), _metrics_row(2, 1, 1, 1, 0)]), None,
                          None, warmup=1, params=10, matmul_gflops=1.0, peak_rss={})
    assert "trl" not in s and "ratio_ours_over_trl" not in s
    assert report.table_rows(s)[1][2] == "-"


def test_no_measured_step_is_a_user_error():
    with pytest.raises(UserError, match="warm-up"):
        report.summarize(report.ours_steps([_metrics_row(1, 1, 1, 1, 0)]), None, None, warmup=1, params=1,
                          matmul_gflops=1.0, peak_rss={})


def test_zero_time_gives_nan_not_an_exception():
    s = report.summarize(report.ours_steps([_metrics_row(1, 0.0, 0.0, 0.0, 0.0)]), None, None, warmup=0,
                          params=1, matmul_gflops=1.0, peak_rss={})
    assert math.isnan(s["ours"]["rollout_tokens_per_s"])


def test_missing_trl_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    with pytest.raises(UserError, match=r"pip install 'megatron_pz\[bench\]'"):
        procs.require_trl()
    assert compare.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs TRL" in err[0]


def test_measuring_note_says_how_memory_is_measured_and_what_measuring_cost():
    from benchmarks.peaks import MEMORY_METHOD

    s = {"sides": {"ours": {"memory_method": MEMORY_METHOD, "monitor_cpu_s": 0.25, "wall_s": 50.0,
                            "monitor_cpu_share": 0.005},
                   "trl": {"memory_method": MEMORY_METHOD, "monitor_cpu_s": 0.1, "wall_s": 40.0,
                           "monitor_cpu_share": 0.0025}}}
    note = compare._measuring_note(s)
    assert "high-water mark" in note and "upper bound" in note
    assert "ours 0.25 CPU-s over 50 s (0.50% of one core)" in note
    assert "trl 0.10 CPU-s over 40 s (0.25% of one core)" in note
