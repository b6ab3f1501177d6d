"""``python -m benchmarks.learning``: does ``megatron-pz train`` learn as fast as TRL on the same task?

    python -m benchmarks.learning --seeds 3 --steps 8 --out docs/figures/learning.png [key=value ...]

Per seed, the same random-span task through both trainers, each in its own process and one thread, side by side:
  ours  ``megatron-pz train`` (embedded rollout, disk weight sync, Megatron step), ``train.seed`` = the seed
  trl   TRL ``GRPOTrainer`` (``benchmarks.trl_grpo``) on the very prompts (token ids) and targets our trainer
        gets for that seed (``benchmarks.workload``), the same lr, batch, group size, lengths and clip settings
The reward is ``brevity`` (rewards/format.py): dense and reachable in a few steps, so both curves should rise.
Prints, per side, the mean reward of the last ``--last-k`` steps with a 95% t-interval over seeds (seeds are
the independent units), and whether the two intervals overlap; writes the PNG of both mean curves (each seed
thin) and a JSON of every curve next to it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.compare import REPO, _env, _read_jsonl
from benchmarks.stats import last_k_mean, overlap, t_interval

CONFIG = "examples/quickstart_cpu.yaml"
# The task of tests/e2e/test_learning.py; advantage.dapo_filter=false because TRL trains every sample
TASK = ["train.objective=random_span", "reward.pred_reward=brevity", "optim.lr=1e-4", "advantage.dapo_filter=false",
        "train.paragraphs_per_step=2", "train.masks_per_paragraph=2", "train.predictions_per_mask=4",
        "train.micro_batch_size=4", "rollout.pred_max_new_tokens=32", "corpus.max_prompt_tokens=200",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_interval=0",
        "checkpoint.save_interval=0"]


def _ours_cmd(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_pz.cli", "train", "--config", CONFIG, *overrides, f"output_dir={run_dir}"]


def _spec(overrides: list[str], steps: int, seed: int, out_dir: Path) -> dict[str, Any]:
    """The TRL side's input: our trainer's prompts for this seed and the matched hyper-parameters."""
    from benchmarks.trl_grpo import GRPOSettings
    from benchmarks.workload import build_workload
    from megatron_pz.config import load_config

    cfg = load_config(str(REPO / CONFIG), overrides)
    return {"workload": build_workload(cfg, steps).to_dict(), "hparams": asdict(GRPOSettings.from_config(cfg)),
            "reward": cfg.reward.pred_reward, "seed": seed, "out_dir": str(out_dir)}


def trl_side(spec_path: str, out_path: str) -> None:
    """Run TRL on a spec written by ``run_seed`` (its own process: ``--trl-side SPEC OUT``)."""
    import torch

    from benchmarks.trl_grpo import GRPOPrompt, GRPOSettings, train_grpo
    from benchmarks.workload import Workload
    from megatron_pz.rewards.registry import get_reward

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    w = Workload.from_dict(spec["workload"])
    prompts = [GRPOPrompt(p.text, p.target, p.ids) for s in w.steps for p in s.prompts]
    fn = get_reward(spec["reward"])
    result = train_grpo(w.hf_dir, prompts, lambda c, t: fn(c, t), GRPOSettings.from_dict(spec["hparams"]),
                        prompts_per_step=len(w.steps[0].prompts), steps=len(w.steps), out_dir=spec["out_dir"],
                        tokenizer_dir=w.tokenizer_dir, seed=int(spec["seed"]))
    Path(out_path).write_text(json.dumps({"rewards": result.rewards, "trl_version": result.trl_version}))


def run_seed(seed: int, steps: int, extra: list[str], work: Path) -> dict[str, list[float]]:
    """Both sides of one seed, at the same time (one core each); returns their per-step mean rewards."""
    overrides = [*TASK, f"train.steps={steps}", f"train.seed={seed}", *extra]
    d = work / f"seed{seed}"
    shutil.rmtree(d, ignore_errors=True)  # never resume an earlier run
    d.mkdir(parents=True)
    (d / "spec.json").write_text(json.dumps(_spec(overrides, steps, seed, d / "trl_out")))
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    cmds = {"ours": _ours_cmd(overrides, d / "ours"),
            "trl": [sys.executable, "-m", "benchmarks.learning", "--trl-side", str(d / "spec.json"),
                    str(d / "trl.json")]}
    procs = {k: subprocess.Popen(c, env=env, cwd=REPO, stdout=open(d / f"{k}.log", "w"), stderr=subprocess.STDOUT)
             for k, c in cmds.items()}
    for k, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"benchmarks.learning: {k} side of seed {seed} failed; log: {d / f'{k}.log'}")
    ours = [r["reward/random_span"] for r in _read_jsonl(d / "ours" / "metrics.jsonl")]
    return {"ours": ours, "trl": json.loads((d / "trl.json").read_text())["rewards"]}


def summarize(curves: dict[str, list[list[float]]], k: int) -> dict[str, Any]:
    """Per side: first-step and last-k means per seed, and the 95% t-interval of the last-k mean over seeds."""
    out: dict[str, Any] = {}
    for side, runs in curves.items():
        last = [last_k_mean(c, k) for c in runs]
        m, lo, hi = t_interval(last)
        out[side] = {"first_step": [c[0] for c in runs], "last_k": last, "last_k_mean": m, "ci95": [lo, hi],
                     "first_step_ci95": list(t_interval([c[0] for c in runs]))}
    if len(curves) == 2:
        a, b = (out[s]["ci95"] for s in curves)
        out["intervals_overlap"] = overlap(a, b) if a[0] == a[0] and b[0] == b[0] else None
    return out


def plot(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (side, runs), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        for c in runs:
            ax.plot(range(1, len(c) + 1), c, color=color, alpha=0.3, lw=1)
        n = min(len(c) for c in runs)
        mean = [sum(c[i] for c in runs) / len(runs) for i in range(n)]
        ax.plot(range(1, n + 1), mean, color=color, lw=2.5, marker="o", label=f"{side} (mean of {len(runs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the step")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trl-side"]:
        trl_side(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (each: its own prompts and sampling)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--last-k", type=int, default=2, help="steps averaged at the end of each curve")
    p.add_argument("--out", default="docs/figures/learning.png", help="the PNG; the JSON is written next to it")
    p.add_argument("--work", default="runs/learning", help="run folders and logs")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the task, both sides")
    a = p.parse_args(argv)
    from benchmarks.procs import require_trl

    require_trl()
    curves: dict[str, list[list[float]]] = {"ours": [], "trl": []}
    for seed in range(a.seeds):
        got = run_seed(seed, a.steps, a.overrides, Path(a.work))
        for side in curves:
            curves[side].append(got[side])
        print(f"seed {seed}: " + "; ".join(f"{s} {[round(x, 3) for x in got[s]]}" for s in curves), flush=True)
    s = summarize(curves, a.last_k)
    for side in curves:
        lo, hi = s[side]["ci95"]
        print(f"{side:5s} first step {s[side]['first_step_ci95'][0]:.3f}, last {a.last_k} steps "
              f"{s[side]['last_k_mean']:.3f}  95% CI [{lo:.3f}, {hi:.3f}] over {a.seeds} seeds")
    print(f"intervals overlap: {s.get('intervals_overlap')}")
    out = Path(a.out)
    plot(curves, out, f"brevity reward, SmolLM2-135M, lr 1e-4, 4 prompts x 4 per step, {a.seeds} seeds")
    command = "python -m benchmarks.learning " + " ".join(argv)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "curves": curves, "summary": s}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
