#!/usr/bin/env python3
"""The PretrainZero vs Random-span experiment of docs/results.md: run the arms, evaluate, report with intervals.

    python tools/experiment.py run runs/exp --warmup runs/exp/warmup --seeds 0 1 2 --steps 8 --jobs 2
    python tools/experiment.py eval runs/exp --jobs 2
    python tools/experiment.py report runs/exp --out docs/results/restate

``run`` trains each arm (``examples/smollm2_<variant>_<arm>.yaml``, ``--variant restate`` or ``cloze``) once per seed from the warm-up's checkpoint
(weights only, fresh optimizer), ``<root>/<arm>_s<seed>``; seed s sets ``train.seed = 1000 + s`` and
``corpus.seed = 1 + s``. A finished run is skipped and an interrupted one resumes, so the experiment can span
sessions. ``eval`` scores the pretrained model, the warm-up's checkpoint (the base arm: greedy, so one evaluation) and every run's final
checkpoint on held-out ``wiki_word`` (one-word spans, as trained), ``wiki_span`` and ``squad_span`` (the arms' prediction prompt, as in training), keeping per-item
records. ``report`` prints and writes ``<out>.md`` (tables) and ``<out>.png`` (curves):
  * the share of predictor groups with mixed rewards per arm and step, pooled over seeds (95 % Wilson);
  * the generator's curriculum per step (valid-mask rate, span length, accuracy on its own spans, its reward);
  * held-out accuracy (strict and lenient) per arm with a 95 % bootstrap interval over seeds and items.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from mixed_groups import wilson  # noqa: E402  (one Wilson interval for both tools)

from megatron_pz.trainer.stages import finished  # noqa: E402  (the tracker test staged runs use)
ARMS = ("random_span", "pretrainzero")
SUITES = ("wiki_word", "wiki_span", "squad_span")
PRED_TASK = {"random_span": "random_span", "pretrainzero": "mask_pred"}


def bootstrap(runs: list[list[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % percentile interval over seeds and items: each replicate resamples the seeds (runs), then
    the items within each drawn run. ``runs``: per seed, per-item scores (0/1)."""
    rng = random.Random(seed)
    mean = statistics.mean(x for r in runs for x in r)
    stats = []
    for _ in range(reps):
        drawn = [runs[rng.randrange(len(runs))] for _ in runs]
        stats.append(statistics.mean(r[rng.randrange(len(r))] for r in drawn for _ in r))
    stats.sort()
    return mean, stats[int(0.025 * reps)], stats[int(0.975 * reps) - 1]


def run_name(arm: str, seed: int, lr: float | None = None) -> str:
    """``<arm>_s<seed>``, or ``<arm>_lr<lr>_s<seed>`` for a run of a learning-rate sweep."""
    return f"{arm}_s{seed}" if lr is None else f"{arm}_lr{lr:g}_s{seed}"


def run_dir(root: Path, arm: str, seed: int, lr: float | None = None) -> Path:
    return root / run_name(arm, seed, lr)


# The experiment's settings beside the run file (issue: on-policy, colocated, shared prompts with micro-batches that
# hold whole groups, the final checkpoint only, every generator sample logged for the curriculum's health).
SETTINGS = ["rollout.colocate=true", "rollout.max_staleness=0", "checkpoint.save_interval=0", "checkpoint.keep_last=1",
            "logging.sample_interval=1", "logging.tensorboard=false"]
FLIP = "reward.pred_reward=control_rewards:neg_continuation_match"  # tools/control_rewards.py


def train_cmd(root: Path, warmup: Path, arm: str, seed: int, steps: int, variant: str = "restate",
              lr: float | None = None, paragraphs: int | None = None) -> list[str]:
    """One run: ``arm`` is ``random_span``, ``pretrainzero`` or ``random_span_flip`` (Random-span on minus the
    reward). ``lr`` sets the peak and a tenth of it as the cosine floor; ``paragraphs`` the paragraphs a step."""
    base_arm = arm.removesuffix("_flip")
    argv = [sys.executable, "-m", "megatron_pz.cli", "train", "--config",
            str(ROOT / "examples" / f"smollm2_{variant}_{base_arm}.yaml"), f"policy.load={warmup / 'checkpoints'}",
            f"output_dir={run_dir(root, arm, seed, lr)}", f"train.seed={1000 + seed}", f"corpus.seed={1 + seed}",
            f"train.steps={steps}", *SETTINGS]
    if paragraphs is not None:  # all generator samples of a step logged: masks_per_paragraph is 4 in the run files
        argv += [f"train.paragraphs_per_step={paragraphs}", f"logging.samples_per_log={4 * paragraphs}"]
    if lr is not None:
        argv += [f"optim.lr={lr:g}", f"optim.min_lr={lr / 10:g}"]
    return argv + ([FLIP] if arm.endswith("_flip") else [])


def launch(jobs: list[tuple[str, list[str], Path]], parallel: int, threads: int = 1) -> int:
    """Run (name, argv, log) jobs, ``parallel`` at a time, ``threads`` each; returns the number that failed."""
    path = os.pathsep.join(filter(None, [str(ROOT / "tools"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}  # tools/ for the control's reward
    pending, running, failed = list(jobs), [], 0
    while pending or running:
        while pending and len(running) < parallel:
            name, argv, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"start  {name}", flush=True)
            running.append((name, subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env),
                            time.time()))
        time.sleep(5)
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                failed += proc.returncode != 0
                print(f"{'done' if proc.returncode == 0 else 'FAILED'}   {name} ({time.time() - t0:.0f} s, exit "
                      f"{proc.returncode})", flush=True)
    return failed


def cmd_run(args) -> int:
    root, warmup = Path(args.root), Path(args.warmup)
    if not (warmup / "checkpoints").is_dir():
        print(f"experiment: {warmup}/checkpoints is missing: run the warm-up first "
              f"(megatron-pz train --config examples/smollm2_{args.variant}_warmup.yaml output_dir={warmup})",
              file=sys.stderr)
        return 2
    runs = [{"name": run_name(arm, s, lr), "arm": arm, "seed": s, "lr": lr}
            for lr in (args.lrs or [None]) for s in args.seeds for arm in args.arms]
    jobs = [(r["name"], train_cmd(root, warmup, r["arm"], r["seed"], args.steps, args.variant, r["lr"],
                                  args.paragraphs), root / r["name"] / "console.log")
            for r in runs if not finished(root / r["name"], args.steps)]
    path = root / "experiment.json"
    exp = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    known = {r["name"] for r in exp.get("runs", [])}
    exp.update(warmup=str(warmup), variant=args.variant, steps=args.steps, paragraphs=args.paragraphs,
               runs=exp.get("runs", []) + [r for r in runs if r["name"] not in known])
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(exp, indent=1))
    return 1 if launch(jobs, args.jobs, args.threads) else 0


def eval_cmd(load: Path, out: Path, limit: int, suites: list[str], variant: str = "restate") -> list[str]:
    return [sys.executable, "-m", "megatron_pz.cli", "eval", "--load", str(load), "--suite", ",".join(suites),
            "--limit", str(limit), "--restate", *(["--cloze"] if variant == "cloze" else []),
            "--max-new-tokens", "6", "--temperature", "0", "--out", str(out)]


def cmd_eval(args) -> int:
    root = Path(args.root)
    exp = json.loads((root / "experiment.json").read_text())
    targets = [("pretrained", Path("smollm2")), ("base", Path(exp["warmup"]))]
    targets += [(f"{a}_s{s}", run_dir(root, a, s)) for a in ARMS for s in exp["seeds"]]
    jobs = []
    for name, run in targets:  # only the suites a target still lacks (an interrupted eval keeps what it finished)
        missing = [s for s in SUITES if not (root / "eval" / name / f"eval_{s}.json").is_file()]
        if missing:
            cmd = eval_cmd(run, root / "eval" / name / "part", args.limit, missing, exp.get("variant", "restate"))
            jobs.append((f"eval {name} ({', '.join(missing)})", cmd, root / "eval" / f"{name}.log"))
    rc = launch(jobs, args.jobs)
    for name, _ in targets:  # each eval writes its suites' files into part/: move them up
        part = root / "eval" / name / "part"
        for f in part.glob("eval_*.json") if part.is_dir() else []:
            f.replace(part.parent / f.name)
    return 1 if rc else 0


def item_scores(path: Path, key: str) -> list[float]:
    doc = json.loads(path.read_text())
    return [float(r["responses"][0][key]) for r in doc["records"]]


def metrics(run: Path) -> list[dict]:
    from megatron_pz.eval.curves import load_metrics

    return load_metrics(run)


def cmd_report(args) -> int:
    root, out = Path(args.root), Path(args.out)
    exp = json.loads((root / "experiment.json").read_text())
    seeds, lines = exp["seeds"], []
    runs = {a: {s: metrics(run_dir(root, a, s)) for s in seeds if (run_dir(root, a, s) / "metrics.jsonl").is_file()}
            for a in ARMS}
    # ---- mixed predictor groups per arm and step, pooled over seeds
    lines += ["## Predictor groups with mixed rewards (pooled over seeds; 95 % Wilson)", "",
              "| arm | " + " | ".join(f"step {i}" for i in range(1, exp["steps"] + 1)) + " | all steps |",
              "|---|" + "---:|" * (exp["steps"] + 1)]
    mixed_curve = {}
    for arm, by_seed in runs.items():
        task, cells, tk, tn, curve = PRED_TASK[arm], [], 0, 0, []
        for step in range(1, exp["steps"] + 1):
            rows = [r for rs in by_seed.values() for r in rs if r["step"] == step]
            k = sum(int(r.get(f"groups_mixed/{task}", 0)) for r in rows)
            n = sum(int(r.get(f"groups/{task}", 0)) for r in rows)
            tk, tn = tk + k, tn + n
            cells.append(f"{k}/{n}" + (f" ({k / n:.0%})" if n else ""))
            curve.append(k / n if n else float("nan"))
        lo, hi = wilson(tk, tn)
        mixed_curve[arm] = curve
        lines.append(f"| {arm} ({len(by_seed)} seeds) | " + " | ".join(cells) +
                     f" | **{tk}/{tn} = {tk / max(tn, 1):.1%}** [{lo:.1%}, {hi:.1%}] |")
    # ---- generator curriculum (PretrainZero), mean over seeds per step
    keys = (("mask/valid_rate", "valid-mask rate"), ("mask/span_words_mean", "span words"),
            ("mask/span_chars_mean", "span chars"), ("acc/mask_pred", "accuracy on own spans"),
            ("reward/mask_gen", "generator reward"), ("reward/random_span", "Random-span reward"))
    lines += ["", "## Curriculum per step (mean over seeds; blank = no value that step)", "",
              "| metric | arm | " + " | ".join(f"step {i}" for i in range(1, exp["steps"] + 1)) + " |",
              "|---|---|" + "---:|" * exp["steps"]]
    for key, title in keys:
        for arm, by_seed in runs.items():
            vals = []
            for step in range(1, exp["steps"] + 1):
                xs = [r[key] for rs in by_seed.values() for r in rs if r["step"] == step and key in r]
                vals.append(f"{statistics.mean(xs):.3f}" if xs else "")
            if any(vals):
                lines.append(f"| {title} | {arm} | " + " | ".join(vals) + " |")
    # ---- held-out eval
    prompt = {"cloze": "cloze prompt"}.get(exp.get("variant", "restate"), "restated prompt")
    lines += ["", f"## Held-out accuracy (greedy, {prompt}; mean, 95 % bootstrap over seeds and items)", "",
              "| arm | " + " | ".join(f"{s} {m}" for s in SUITES for m in ("strict", "lenient")) + " |",
              "|---|" + "---:|" * (2 * len(SUITES))]
    arms_eval = {"SmolLM2-135M-Instruct (before the warm-up)": ["pretrained"], "base (warm-up, step 0)": ["base"]} | {f"{a} (step {exp['steps']})": [f"{a}_s{s}" for s in seeds]
                                                        for a in ARMS}
    for title, names in arms_eval.items():
        cells = []
        for suite in SUITES:
            for key in ("correct", "lenient_correct"):
                files = [root / "eval" / n / f"eval_{suite}.json" for n in names]
                files = [f for f in files if f.is_file()]
                if not files:
                    cells.append("–")
                    continue
                m, lo, hi = bootstrap([item_scores(f, key) for f in files])
                n_items = len(item_scores(files[0], key))
                cells.append(f"{m:.1%} [{lo:.1%}, {hi:.1%}] (n={n_items}x{len(files)})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    plot(runs, mixed_curve, exp["steps"], out.with_suffix(".png"))
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


def plot(runs: dict, mixed_curve: dict, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    xs = list(range(1, steps + 1))
    for arm, curve in mixed_curve.items():
        axes[0].plot(xs, curve, marker="o", label=arm)
    axes[0].axhline(0.2, color="grey", ls=":", lw=1)
    axes[0].set(title="mixed predictor groups (pooled over seeds)", xlabel="step", ylim=(0, 1))
    for arm, by_seed in runs.items():
        key = "reward/random_span" if arm == "random_span" else "acc/mask_pred"
        for s, rows in by_seed.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            axes[1].plot(*zip(*pts), marker=".", alpha=0.7, color="C0" if arm == "random_span" else "C1",
                         label=f"{arm}" if s == min(by_seed) else None) if pts else None
    axes[1].set(title="predictor training accuracy (per seed)", xlabel="step")
    for key, label in (("mask/valid_rate", "valid-mask rate"), ("reward/mask_gen", "generator reward")):
        for s, rows in runs.get("pretrainzero", {}).items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                axes[2].plot(*zip(*pts), marker=".", alpha=0.7, color="C2" if "valid" in key else "C3",
                             label=label if s == min(runs["pretrainzero"]) else None)
    axes[2].set(title="PretrainZero generator (per seed)", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("root")
    r.add_argument("--warmup", required=True, help="the warm-up run's output_dir")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--threads", type=int, default=1, help="OMP threads a run")
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=(*ARMS, "random_span_flip"),
                   help="random_span_flip: Random-span on minus the reward (the negative control)")
    r.add_argument("--lrs", type=float, nargs="+", help="a learning-rate sweep (default: the run file's lr)")
    r.add_argument("--paragraphs", type=int, default=2, help="paragraphs a step (train.paragraphs_per_step)")
    r.add_argument("--variant", choices=("restate", "cloze"), default="restate",
                   help="the arms' run files: examples/smollm2_<variant>_<arm>.yaml")
    e = sub.add_parser("eval")
    e.add_argument("root")
    e.add_argument("--limit", type=int, default=64)
    e.add_argument("--jobs", type=int, default=2)
    p = sub.add_parser("report")
    p.add_argument("root")
    p.add_argument("--out", default="docs/results/restate")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "eval": cmd_eval, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
