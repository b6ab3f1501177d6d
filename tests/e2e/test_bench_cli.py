"""``python -m benchmarks.compare`` end to end on a tiny random Llama (SmolLM2's tokenizer): ours, TRL, plain generate.

Two steps per side (one warm-up, one measured). Checks that bench.json / bench.md carry every column and that the
ratios are computed from the measured per-step values, and that the three sides ran the same workload.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
REPO = Path(__file__).resolve().parents[2]



def test_bench_compare_one_measured_step(tiny_policy, tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--out", str(out), "--steps", "2",
                        "--threads", "1", "--no-pretrainzero", f"policy.load={tiny_policy}",
                        "rollout.pred_max_new_tokens=8", "corpus.max_prompt_tokens=200"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    for word in ("megatron_pz", "TRL GRPOTrainer", "ours / TRL", "rollout tokens/s", "train tokens/s", "peak memory",
                 "FLOP/s", "plain transformers generate", "weight sync", "idle", "high-water mark",
                 "The bench's own CPU while each side ran: ours"):
        assert word in p.stdout, word
    s = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().startswith("| metric |")
    o, t, r = s["ours"], s["trl"], s["ratio_ours_over_trl"]
    for key in ("step_s", "rollout_tokens_per_s", "train_tokens_per_s", "peak_rss_bytes"):
        assert o[key] > 0 and t[key] > 0
        assert r[key] == pytest.approx(o[key] / t[key])
    # one measured step: the figures are that step's values
    ours2, trl2, gen2 = s["per_step"]["ours"][1], s["per_step"]["trl"][1], s["per_step"]["generate"][1]
    assert o["rollout_tokens_per_s"] == pytest.approx(ours2["generated_tokens"] / ours2["rollout_s"])
    assert o["train_tokens_per_s"] == pytest.approx(ours2["trained_tokens"] / ours2["train_s"])
    assert t["step_s"] == pytest.approx(trl2["step_s"])
    assert s["generate"]["tokens_per_s"] == pytest.approx(gen2["generated_tokens"] / gen2["generate_s"])
    assert o["rollout_over_generate"] == pytest.approx(o["rollout_tokens_per_s"] / s["generate"]["tokens_per_s"])
    # train FLOP/s: the FLOPs the trainer executed (train/flops, its micro-batches as laid out) over the train time
    assert o["train_flops_source"] == "executed" and ours2["train_flops"] > 0
    assert 0 < o["train_flops_over_matmul"] and o["train_flops_per_s"] == pytest.approx(
        ours2["train_flops"] / ours2["train_s"])
    assert sum(o["share"].values()) == pytest.approx(1.0, abs=1e-6)
    # memory from the kernel's marks: ours counts the trainer and its rollout server, never a forked copy
    sides = s["sides"]
    counted = [q["peak_bytes"] for q in sides["ours"]["processes"] if not q["forked"]]
    assert len([b for b in counted if b > 50e6]) >= 2  # trainer and server import torch: their marks were read
    assert o["peak_rss_bytes"] == sides["ours"]["peak_rss_bytes"] == sum(counted)
    for side in ("ours", "trl", "generate"):
        assert 0 <= sides[side]["monitor_cpu_s"] < sides[side]["wall_s"]
    # the same workload: same paragraphs, same prompt tokens; a random tiny model never emits EOS in 8 tokens,
    # so both sides generate and train exactly the same number of tokens
    assert s["same_paragraphs"]
    assert ours2["generated_tokens"] == trl2["generated_tokens"] == gen2["generated_tokens"] == 16 * 8
    assert ours2["trained_tokens"] == pytest.approx(trl2["trained_tokens"])
