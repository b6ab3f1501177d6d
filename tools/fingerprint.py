"""Figures a behaviour-preserving change must leave bitwise identical, printed as one JSON document.

    python tools/fingerprint.py OUT.json        # then: diff two outputs (before / after a change)

What it runs, all on CPU with one thread per process, at fixed seeds:
  * ``megatron-pz train`` on a tiny random Llama (SmolLM2's tokenizer): PretrainZero at TP1 (2 steps), and
    Random-span with a reward that has variance (so the GRPO update really runs) at TP1 and TP2 over gloo;
    every logged metric except wall times, plus a sha256 of the weights of the last version pushed;
  * the Megatron-vs-HF parity tests (their printed max |diff|);
  * the kill -9 resume test (pass/fail: its data order equals the uninterrupted run's).
Rollouts are seeded (``rollout.reproducible``), which makes the sampled figures repeat from run to run at the same
seed and thread count. The stored figures (docs/figures/fingerprint_*.json) were measured when a request's samples
shared one seed; sampling now seeds each sample (rollout/seeds.py), so today's tree gives other sampled figures.
The before/after comparison in docs/architecture.md is between two trees measured the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["train.paragraphs_per_step=2", "train.masks_per_paragraph=2", "train.predictions_per_mask=4",
         "rollout.gen_max_new_tokens=16", "rollout.pred_max_new_tokens=12", "corpus.max_prompt_tokens=200",
         "logging.progress_bar=false", "checkpoint.save_interval=1",
         # One sampling seed per request: without it the embedded server draws every request from one
         # generator in whatever order the requests arrive, and the sampled figures differ run to run.
         "rollout.reproducible=true"]
VOLATILE = re.compile(r"^(time/|throughput/|timing/)|_s$|_per_s|per_100m")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "e2e"), str(REPO), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    return e


def tiny_policy(folder: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import save_tiny_policy  # the test suite's own tiny_policy fixture builder

    from megatron_pz.convert.smollm2 import prepare_smollm2

    return save_tiny_policy(folder, prepare_smollm2()[0])


def train(out: Path, policy: str, *extra: str, nproc: int = 1) -> dict:
    args = ["--config", str(REPO / "examples/quickstart_cpu.yaml"), f"policy.load={policy}", f"output_dir={out}",
            *SMALL, *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_pz.cli", "train", *args]
    else:
        from megatron_pz.parallel import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "megatron_pz.train", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not VOLATILE.search(k)} for r in rows]
    versions = sorted((out / "weights").glob("v*"))
    h = hashlib.sha256()
    for f in sorted(versions[-1].glob("*.safetensors")):
        h.update(f.read_bytes())
    return {"metrics": rows, "weights_sha256": h.hexdigest()}


def pytest_figures(*selectors: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *selectors],
                       capture_output=True, text=True, env=env(), cwd=REPO, timeout=1800)
    lines = [l.strip() for l in p.stdout.splitlines() if "max|" in l]
    return {"returncode": p.returncode, "figures": lines, "summary": p.stdout.strip().splitlines()[-1:]}


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    tmp = Path(tempfile.mkdtemp(prefix="fingerprint_"))
    policy = tiny_policy(tmp / "policy")
    rs = ["train.objective=random_span", "reward.pred_reward=plugin_rewards:odd_length"]
    doc = {
        "pretrainzero_tp1": train(tmp / "pz", policy, "train.steps=2"),
        "random_span_tp1": train(tmp / "rs1", policy, "train.steps=2", *rs),
        "random_span_tp2": train(tmp / "rs2", policy, "train.steps=2", *rs,
                                 "parallel.tensor_model_parallel_size=2", nproc=2),
        "parity": pytest_figures("tests/distributed/test_megatron_parity.py"),
        "kill9_resume": pytest_figures("tests/e2e/test_train_e2e.py::test_kill9_mid_run_resumes_with_the_same_data"),
    }
    text = json.dumps(doc, indent=1, sort_keys=True)
    if dest:
        dest.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
