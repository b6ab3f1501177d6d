"""The real training entry point (``megatron-pz train`` / ``torchrun -m megatron_pz.train``) on a tiny model.

A 2-layer random Llama with SmolLM2's tokenizer, the shipped Wikipedia sample and the embedded rollout
server; each run is a few steps of a scaled-down batch.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_pz.parallel import free_port

pytestmark = pytest.mark.multiproc
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SMALL = ["train.paragraphs_per_step=2", "train.masks_per_paragraph=2", "train.predictions_per_mask=4",
         "rollout.gen_max_new_tokens=16", "rollout.pred_max_new_tokens=12", "corpus.max_prompt_tokens=200",
         "logging.progress_bar=false", "checkpoint.save_interval=1"]



def command(out, policy, *extra, nproc=1):
    args = ["--config", str(REPO / "examples/quickstart_cpu.yaml"), f"policy.load={policy}",
            f"output_dir={out}", *SMALL, *extra]
    if nproc == 1:
        return [sys.executable, "-m", "megatron_pz.cli", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "megatron_pz.train", *args]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    return e


def run(cmd, timeout=600):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-4000:]}"
    return p


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_pretrainzero_tp1_two_steps(tiny_policy, tmp_path):
    out = tmp_path / "run"
    p = run(command(out, tiny_policy, "train.steps=2", "eval.interval=2", "eval.suites=[wiki_span]", "eval.limit=3",
                    "eval.max_new_tokens=6"))
    # The console is for people: the set-up in a few lines and one line per step; library chatter (Megatron's
    # parameter-name and config dumps, "Apex is not installed" warnings, our INFO details) is in train.log.
    console = p.stdout + p.stderr
    for chatter in ("Apex", "decoder.layers.0", "OptimizerConfig(", "UserWarning", " INFO "):
        assert chatter not in console, chatter
    lines = p.stdout.splitlines()
    assert lines[0].startswith("model    ") and any(line.startswith("output   ") for line in lines)
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/2", "step 2/2"]
    assert all("reward mask_gen" in line and "masks valid" in line and "trained" in line for line in steps)
    assert len(lines) <= 10, lines
    assert all(line.startswith("megatron-pz: ") for line in p.stderr.splitlines()), p.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "megatron.core" in log and "megatron_pz.rollout.launcher" in log and "step 2/2" in log
    # A step's checkpoint is published only after its lines are written: a kill in between repeats the step
    # instead of resuming past lines that were never written.
    at = lambda text: next(i for i, line in enumerate(log.splitlines()) if text in line)
    assert at("step 1/2 |") < at("checkpoint iter_0000001: published") < at("step 2/2 |")
    assert at("step 2/2 |") < at("checkpoint iter_0000002: published")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # periodic eval: the initial weights (its own line at step 0) and after step 2 (interval 2), not after step 1
    evals = {r["step"]: r for r in rows if "eval/wiki_span/accuracy" in r}
    assert sorted(evals) == [0, 2] and evals[0]["weight_version"] == 0 and evals[2]["weight_version"] == 2
    for r in evals.values():
        assert r["eval/wiki_span/n"] == 3 and 0.0 <= r["eval/wiki_span/accuracy"] <= 1.0
        assert 0 < r["eval/wiki_span/mean_response_tokens"] <= 6
    assert "time/eval" in rows[2] and "time/eval" not in rows[1]
    rows = rows[1:]
    for r in rows:
        # both tasks ran: 2 paragraphs x 2 masks generator samples, their rewards and mask statistics
        assert r["count/mask_gen"] == 4 and "reward/mask_gen" in r and "rollout/mask_valid_frac" in r
        assert r["train/microbatches"] >= 1 and "train/grad_norm" in r
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    meta = json.loads((out / "checkpoints" / "iter_0000002" / "megatron_pz.json").read_text())
    assert meta["step"] == 2 and meta["weight_version"] == 2 and "0" in meta["corpus"]
    assert rows[-1]["weight_version"] == 2
    # first-step on-policy check (all generated tokens, filtered ones too): engine and trainer agree (fp32)
    assert rows[0]["onpolicy/tokens"] > 0 and rows[0]["onpolicy/logprob_abs_diff_max"] < 1e-3
    assert "onpolicy/tokens" not in rows[1]
    # a random tiny model writes no valid \mask{}: DAPO filters every group, and a step without a trainable token
    # must leave the weights exactly as they were (no AdamW weight decay on zero gradients)
    assert all(r["train/tokens"] == 0 and r["train/update_skipped"] == 1 for r in rows)
    from safetensors.torch import load_file

    before = {k: v for f in Path(tiny_policy).glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in (out / "weights" / "v00000002").glob("*.safetensors") for k, v in load_file(f).items()}
    common = set(before) & set(after)
    assert len(common) >= len(before) - 1  # lm_head may be tied away
    assert all(torch.equal(before[k].float(), after[k].float()) for k in common)


@pytest.mark.parametrize("layout", [["parallel.pipeline_model_parallel_size=2"],
                                    ["parallel.tensor_model_parallel_size=2"],
                                    ["parallel.pipeline_model_parallel_size=2", "train.shared_prompt=true"],
                                    ["parallel.pipeline_model_parallel_size=2", "train.shared_prompt=true",
                                     "train.max_tokens_per_microbatch=768"]],
                         ids=["pp2", "tp2", "pp2-shared-prompt", "pp2-packed-shared-prompt"])
def test_random_span_two_ranks_trains(tiny_policy, tmp_path, layout):
    out = tmp_path / "run"
    p = run(command(out, tiny_policy, "train.steps=2", "train.objective=random_span",
                    "reward.pred_reward=plugin_rewards:odd_length", *layout, nproc=2))
    # torchrun -m megatron_pz.train: Megatron's import-time warnings go to train.log, not the console
    assert "UserWarning" not in p.stdout + p.stderr and "Apex" not in p.stdout + p.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["count/random_span"] == 16 for r in rows)  # 2 paragraphs x 2 spans x 4 predictions
    trained = [r for r in rows if r.get("train/tokens", 0) > 0]
    assert trained, "no step had a trainable (non-filtered) group"
    for r in trained:
        assert r["train/grad_norm"] > 0 and "train/loss" in r
        # first-step on-policy check: engine (HF fp32) and trainer (Megatron fp32) log-probs agree
        assert r["train/mismatch_abs_max"] < 1e-3, r["train/mismatch_abs_max"]
    assert (out / "checkpoints" / "iter_0000002" / "metadata.json").exists()


def test_rpt_two_steps_builds_rewards_and_trains_next_token_samples(tiny_policy, tmp_path):
    """train.objective=rpt: the policy's own top-K entropies (served by the embedded engine) pick 2 positions per
    paragraph, 4 answers each. The reward is a plug-in with variance (a random model never boxes the right token, so
    the byte-prefix reward would be 0 everywhere and DAPO would filter every group), so the GRPO update really runs;
    the byte-prefix reward on this path is tested in test_core_next_token.py."""
    out = tmp_path / "run"
    p = run(command(out, tiny_policy, "train.steps=2", "train.objective=rpt", "rpt.min_context_tokens=4",
                    "reward.next_token_reward=plugin_rewards:odd_length"))
    assert "2 paragraphs x 2 next-token positions x 4 predictions" in p.stdout
    assert all("reward next_token" in line for line in p.stdout.splitlines() if line.startswith("step "))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["count/next_token"] == 16  # 2 paragraphs x 2 positions x 4 predictions
        assert r["rollout/next_token_positions"] == 4 and "reward/next_token" in r
        # entropies of a top-16 distribution: in (0, ln 16]
        for key in ("rollout/next_token_entropy_mean", "rollout/paragraph_entropy_mean"):
            assert 0 < r[key] <= math.log(16) + 1e-6, (key, r[key])
    trained = [r for r in rows if r.get("train/tokens", 0) > 0]
    assert trained and all(r["train/grad_norm"] > 0 for r in trained)
    assert rows[0]["onpolicy/logprob_abs_diff_max"] < 1e-3
    dumped = [json.loads(line) for line in (out / "samples" / "step_0000001.jsonl").read_text().splitlines()]
    rec = next(d for d in dumped if d["task"] == "next_token")
    m = rec["metadata"]
    assert "### Context" in rec["prompt_text"] and m["target"] and m["position"] >= 4 and m["entropy"] > 0
    assert rec["group_id"].startswith("s0/r0/p") and f"/pos{m['position']}" in rec["group_id"]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def _wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    path = Path(out) / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_kill9_mid_run_resumes_with_the_same_data(tiny_policy, tmp_path):
    extra = ["train.steps=4", "train.objective=random_span", "reward.pred_reward=plugin_rewards:odd_length"]
    ref = tmp_path / "uninterrupted"
    run(command(ref, tiny_policy, *extra))
    out = tmp_path / "killed"
    cmd = command(out, tiny_policy, *extra)
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for_step(out, 2, proc)
        time.sleep(1.0)  # now inside step 3: rollout under way
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() in ("2", "3")
    run(cmd)  # the same command resumes
    order = lambda d: [json.loads(l) for l in (d / "data_order.jsonl").read_text().splitlines()]
    assert order(out) == order(ref)  # every step saw the same paragraphs as the uninterrupted run
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # each step logged exactly once


def test_external_server_with_distributed_weight_sync(tiny_policy, tmp_path):
    """rollout.backend=sglang against a running server (the embedded one speaks SGLang's API) with the NCCL-style
    broadcast weight sync, here over gloo: the trainer pushes every version into the server's process group."""
    from megatron_pz.rollout.launcher import ServerSpec, launch, stop_all

    servers = launch([ServerSpec(kind="embedded", model_path=tiny_policy, port=free_port(),
                                 log_path=str(tmp_path / "server.log"))], health_timeout_s=300)
    try:
        out = tmp_path / "run"
        run(command(out, tiny_policy, "train.steps=2", "train.objective=random_span",
                    "reward.pred_reward=plugin_rewards:odd_length", "rollout.backend=sglang",
                    f"rollout.urls=[{servers[0].url}]", "rollout.weight_sync=distributed",
                    "rollout.weight_sync_backend=gloo", "rollout.weight_sync_master_address=127.0.0.1"))
    finally:
        stop_all(servers)
    rows = metrics(out)
    # version 1 = the trainer's initial weights pushed at start-up, then one per step
    assert [r["weight_version"] for r in rows] == [2, 3]
    assert rows[0]["onpolicy/logprob_abs_diff_max"] < 1e-3
    log = (tmp_path / "server.log").read_text()
    assert all(f"weights updated to version {v}" in log for v in (1, 2, 3))


def test_a_dead_rollout_server_is_named_in_one_line_and_loses_nothing(tiny_policy, tmp_path):
    """An external rollout server that is down: exit 3, its URL and endpoint in one line plus how to resume, no
    traceback. Run twice: the second run is not tripped up by what the first left behind (it used to fail on the
    weight folder the first had written)."""
    out = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cmd = command(out, tiny_policy, "train.steps=1", "train.objective=random_span", "rollout.backend=sglang",
                  f"rollout.urls=[{dead}]", "rollout.max_retries=0")
    for _ in range(2):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=REPO)
        assert p.returncode == 3, p.stderr[-3000:]
        assert "Traceback" not in p.stderr
        last = p.stderr.strip().splitlines()[-2:]
        assert last[0].startswith("megatron-pz train: rollout error: ") and dead in last[0], last
        assert "/update_weights_from_disk" in last[0]
        assert last[1].startswith("megatron-pz train: nothing saved is lost") and str(out) in last[1], last
