#!/usr/bin/env python3
"""The PretrainZero vs Random-span experiment of docs/results.md: train the arms, score them held out, report.

    python tools/experiment.py run runs/exp --warmup runs/exp/warmup --variant cloze --seeds 0 1 2 --steps 60 \
        --arms random_span pretrainzero --lrs 1e-4
    python tools/experiment.py run runs/exp --warmup runs/exp/warmup --variant cloze --seeds 0 --steps 60 \
        --arms random_span_flip --lrs 1e-4
    python tools/experiment.py eval runs/exp --split test --items 1000
    python tools/experiment.py report runs/exp --split test --items 1000 --out docs/results/heldout

``run`` trains each arm (``examples/smollm2_<variant>_<arm>.yaml``) per seed and learning rate from the warm-up's
checkpoint (weights only, fresh optimizer) into ``<root>/<arm>[_lr<lr>]_s<seed>``: seed s sets ``train.seed =
1000 + s`` and ``corpus.seed = 1 + s``, so the same seed reads the same paragraphs in every arm;
``random_span_flip`` is Random-span on minus the reward (the negative control). Runs are on-policy and colocated
(``SETTINGS``). A finished run is skipped and an interrupted one resumes from its last save, so the experiment
can span sessions. ``eval`` scores the warm-up's weights (the base) and every finished run's final checkpoint with
``megatron-pz heldout`` (p(span), log p, greedy exact match, plain-text NLL; per-item records). ``report`` writes
``<out>.md`` and ``<out>.png``: each run's iteration, max|dw| and trained tokens, run - base per metric (also per
10k trained predictor tokens), the seeds pooled, PretrainZero - Random-span per seed, paired and with 95 % cluster
bootstrap intervals over articles, and the generator's health (entropy, valid masks, distinct spans, length).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
PRED_TASK = {"random_span": "random_span", "pretrainzero": "mask_pred"}


def run_name(arm: str, seed: int, lr: float | None = None) -> str:
    """``<arm>_s<seed>``, or ``<arm>_lr<lr>_s<seed>`` for a run of a learning-rate sweep."""
    return f"{arm}_s{seed}" if lr is None else f"{arm}_lr{lr:g}_s{seed}"


def run_dir(root: Path, arm: str, seed: int, lr: float | None = None) -> Path:
    return root / run_name(arm, seed, lr)


# The experiment's settings beside the run file (issue: on-policy, colocated, shared prompts with micro-batches that
# hold whole groups, the final checkpoint only, every generator sample logged for the curriculum's health).
SETTINGS = ["rollout.colocate=true", "rollout.max_staleness=0", "checkpoint.keep_last=1", "logging.sample_interval=1",
            "logging.tensorboard=false",
            # The dense shared-prompt mask the main experiment's first runs trained with (before the segment
            # attention became auto's choice): every run of one experiment takes the same training path.
            "train.shared_prompt_attention=dense"]
VARIANTS = {  # arm -> (the run file's arm, its overrides)
    "random_span_flip": ("random_span", ["reward.pred_reward=control_rewards:neg_continuation_match"]),  # control
    "pretrainzero_repeat": ("pretrainzero", ["reward.gen_repeat_penalty=true"]),  # spans kept diverse
}


def train_cmd(root: Path, warmup: Path, arm: str, seed: int, steps: int, variant: str = "restate",
              lr: float | None = None, paragraphs: int | None = None, save_interval: int = 0) -> list[str]:
    """One run: ``arm`` is ``random_span``, ``pretrainzero`` or one of ``VARIANTS``. ``lr`` sets the peak and a tenth of it as the cosine floor; ``paragraphs`` the paragraphs a step;
    ``save_interval`` 0 saves the final checkpoint only (a run killed before it starts again from step 1)."""
    base_arm, extra = VARIANTS.get(arm, (arm, []))
    argv = [sys.executable, "-m", "megatron_pz.cli", "train", "--config",
            str(ROOT / "examples" / f"smollm2_{variant}_{base_arm}.yaml"), f"policy.load={warmup / 'checkpoints'}",
            f"output_dir={run_dir(root, arm, seed, lr)}", f"train.seed={1000 + seed}", f"corpus.seed={1 + seed}",
            f"train.steps={steps}", f"checkpoint.save_interval={save_interval}", *SETTINGS]
    if paragraphs is not None:  # all generator samples of a step logged: masks_per_paragraph is 4 in the run files
        argv += [f"train.paragraphs_per_step={paragraphs}", f"logging.samples_per_log={4 * paragraphs}"]
    if lr is not None:
        argv += [f"optim.lr={lr:g}", f"optim.min_lr={lr / 10:g}"]
    return argv + extra


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
            proc = subprocess.Popen(argv, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env)
            running.append((name, proc, time.time()))
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
                                  args.paragraphs, args.save_interval), root / r["name"] / "console.log")
            for r in runs if not finished(root / r["name"], args.steps)]
    path = root / "experiment.json"
    exp = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    known = {r["name"] for r in exp.get("runs", [])}
    exp.update(warmup=str(warmup), variant=args.variant, steps=args.steps, paragraphs=args.paragraphs,
               runs=exp.get("runs", []) + [r for r in runs if r["name"] not in known])
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(exp, indent=1))
    return 1 if launch(jobs, args.jobs, args.threads) else 0


def heldout_cmd(load: Path, reference: Path, out: Path, split: str, items: int, variant: str,
                base: bool = False) -> list[str]:
    """Score ``load`` on held-out one-word spans (``megatron-pz heldout``) with the Random-span run file's layout:
    both arms share it, and the flipped control's run file would name its minus reward."""
    return [sys.executable, "-m", "megatron_pz.cli", "heldout", "--load", str(load), "--reference", str(reference),
            "--split", split, "--items", str(items), "--config",
            str(ROOT / "examples" / f"smollm2_{variant}_random_span.yaml"), "--out", str(out),
            *(["--allow-unchanged"] if base else [])]


def heldout_dir(root: Path, split: str, items: int) -> Path:
    return root / f"heldout_{split}_{items}"


def cmd_eval(args) -> int:
    root = Path(args.root)
    exp = json.loads((root / "experiment.json").read_text())
    warmup, variant = Path(exp["warmup"]), exp.get("variant", "cloze")
    folder = heldout_dir(root, args.split, args.items)
    targets = [("base", warmup, True)] + [(r["name"], root / r["name"], False) for r in exp["runs"]
                                          if finished(root / r["name"], exp["steps"])]
    if args.runs:  # only these (another eval may be scoring the rest)
        targets = [t for t in targets if t[0] in args.runs]
    jobs = [(f"heldout {name}", heldout_cmd(load, warmup, folder / f"{name}.json", args.split, args.items, variant,
                                            base), folder / f"{name}.log")
            for name, load, base in targets if not (folder / f"{name}.json").is_file()]
    return 1 if launch(jobs, args.jobs, args.threads) else 0


def distinct_per_100(spans: list[str]) -> float:
    """Distinct spans per 100 masks: the number of distinct strings among ``spans``, scaled to 100 (a collapse onto
    a few words gives a small number; 100 = no repeats)."""
    return 100.0 * len(set(spans)) / len(spans) if spans else float("nan")


def generator_spans(run: Path) -> dict[int, list[str]]:
    """Per step, the valid spans the generator chose (every generator sample is logged: SETTINGS)."""
    out: dict[int, list[str]] = {}
    for f in sorted((run / "samples").glob("step_*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        out[int(f.stem.removeprefix("step_"))] = [r["metadata"]["span"] for r in rows if r.get("task") == "mask_gen"
                                                  and r.get("metadata", {}).get("mask_valid")]
    return out


def generator_health(run: Path, window: int = 5) -> dict[str, object]:
    """The curriculum's health over the first and the last ``window`` steps: the generator's entropy, the valid-mask
    rate, distinct spans per 100 valid masks, their mean length in characters and the most frequent spans."""
    rows, spans = metrics(run), generator_spans(run)
    steps = sorted(spans)
    out: dict[str, object] = {}
    for name, sel in (("first", steps[:window]), ("last", steps[-window:])):
        chosen = [x for st in sel for x in spans[st]]
        ent = [r["entropy/mask_gen"] for r in rows if r["step"] in sel and "entropy/mask_gen" in r]
        valid = [r["mask/valid_rate"] for r in rows if r["step"] in sel and "mask/valid_rate" in r]
        top = sorted(set(chosen), key=lambda x: (-chosen.count(x), x))[:5]
        out[name] = {"steps": sel, "entropy": statistics.mean(ent) if ent else float("nan"),
                     "valid_rate": statistics.mean(valid) if valid else float("nan"), "masks": len(chosen),
                     "distinct_per_100": distinct_per_100(chosen),
                     "span_chars": statistics.mean(map(len, chosen)) if chosen else float("nan"),
                     "top": [f"{x!r} x{chosen.count(x)}" for x in top]}
    return out


def metrics(run: Path) -> list[dict]:
    from megatron_pz.eval.curves import load_metrics

    return load_metrics(run)


METRICS = (("p", "p(span)", "{:+.4f}"), ("log_p", "log p(span)", "{:+.3f}"), ("exact", "greedy exact", "{:+.3f}"),
           ("nll", "NLL/token (plain text)", "{:+.4f}"))
"""Held-out metrics of ``megatron-pz heldout``: field, title, format of a difference (nll: per token)."""


def averaged(record_sets: list[list[dict]]) -> list[dict]:
    """Per item, the mean of each metric over the runs (seeds) in ``record_sets``: a pooled arm, paired by item."""
    by_key = [{r["key"]: r for r in rs} for rs in record_sets]
    out = []
    for key, first in by_key[0].items():
        rows = [b[key] for b in by_key]
        out.append({**first, **{f: statistics.fmean(float(r[f]) for r in rows) for f, _, _ in METRICS}})
    return out


def trained_tokens(rows: list[dict], task: str) -> float:
    return sum(r.get(f"trained_tokens/{task}", 0.0) for r in rows)


def arm_of(arm: str) -> str:
    """The run file's arm of an arm or variant."""
    return VARIANTS.get(arm, (arm, []))[0]


def interval_cell(iv, fmt: str) -> str:
    mark = "" if iv.low <= 0 <= iv.high else " *"
    return f"{fmt.format(iv.estimate)} [{fmt.format(iv.low)}, {fmt.format(iv.high)}]{mark}"


def cmd_report(args) -> int:
    from megatron_pz.eval.heldout_stats import compare, load_records

    root, out = Path(args.root), Path(args.out)
    exp = json.loads((root / "experiment.json").read_text())
    folder = heldout_dir(root, args.split, args.items)
    docs = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
    if "base" not in docs:
        print(f"experiment: {folder}/base.json is missing: run `experiment.py eval` first", file=sys.stderr)
        return 2
    base = docs["base"]["records"]
    runs = [r for r in exp["runs"] if r["name"] in docs]
    rows = {r["name"]: metrics(root / r["name"]) for r in runs}
    tokens = {r["name"]: trained_tokens(rows[r["name"]], PRED_TASK[arm_of(r["arm"])]) for r in runs}
    sb = docs["base"]["summary"]
    lines = [f"Held-out: {sb['n']} one-word spans of `{args.split}` ({sb['articles']} articles), the cloze layout; "
             f"base = the warm-up's weights (iteration {docs['base']['iteration']}): mean p(span) {sb['mean_p']:.4f}, "
             f"mean log p {sb['mean_log_p']:.3f}, greedy exact {sb['exact']:.3f}, NLL {sb['nll_per_token']:.4f} "
             f"nats/token. Differences are paired by item, 95 % cluster bootstrap over articles; * = excludes 0.", "",
             "## Runs", "", "| run | lr | steps | iteration scored | max abs dw | trained predictor tokens | "
             "trained generator tokens | mixed predictor groups |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        d, rs, task = docs[r["name"]], rows[r["name"]], PRED_TASK[arm_of(r["arm"])]
        mixed = sum(x.get(f"groups_mixed/{task}", 0) for x in rs), sum(x.get(f"groups/{task}", 0) for x in rs)
        lo, hi = wilson(int(mixed[0]), int(mixed[1]))
        lines.append(f"| {r['name']} | {r['lr'] if r['lr'] is not None else 'run file'} | {len(rs)} | "
                     f"{d['iteration']} | {d['max_abs_dw']:.3g} | {tokens[r['name']]:.0f} | "
                     f"{trained_tokens(rs, 'mask_gen'):.0f} | {mixed[0]:.0f}/{mixed[1]:.0f} "
                     f"[{lo:.0%}, {hi:.0%}] |")
    for field, title, fmt in METRICS:
        lines += ["", f"## {title}: run - base", "", "| run | run - base | per 10k trained predictor tokens |",
                  "|---|---:|---:|"]
        for r in runs:
            recs = docs[r["name"]]["records"]
            iv = compare(base, recs, field)
            scale = max(tokens[r["name"]], 1.0) / 1e4  # the same resamples scaled: no second bootstrap
            per = dataclasses.replace(iv, estimate=iv.estimate / scale, low=iv.low / scale, high=iv.high / scale)
            lines.append(f"| {r['name']} | {interval_cell(iv, fmt)} | {interval_cell(per, fmt)} |")
        groups: dict[tuple, list[dict]] = {}
        for r in runs:
            groups.setdefault((r["arm"], r["lr"]), []).append(r)
        for (arm, lr), members in groups.items():
            if len(members) > 1:
                pooled = averaged([docs[m["name"]]["records"] for m in members])
                lines.append(f"| **{arm} lr {lr}, mean of {len(members)} seeds** | "
                             f"{interval_cell(compare(base, pooled, field), fmt)} | |")
        pairs = [(x, y) for x in runs for y in runs if x["arm"] == "random_span" and y["arm"] == "pretrainzero"
                 and x["seed"] == y["seed"] and x["lr"] == y["lr"]]
        if pairs:
            lines += ["", f"{title}: PretrainZero - Random-span (same seed and lr)", "", "| seed | lr | PZ - RS |",
                      "|---:|---:|---:|"]
            for x, y in pairs:
                iv = compare(docs[x["name"]]["records"], docs[y["name"]]["records"], field)
                lines.append(f"| {x['seed']} | {x['lr']} | {interval_cell(iv, fmt)} |")
    pz = [r for r in runs if arm_of(r["arm"]) == "pretrainzero"]
    if pz:
        lines += ["", "## The generator's health (first and last 5 steps)", "",
                  "| run | window | entropy | valid-mask rate | valid masks | distinct spans per 100 | span chars | "
                  "most frequent |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in pz:
            for window, h in generator_health(root / r["name"]).items():
                lines.append(f"| {r['name']} | {window} {h['steps'][0]}-{h['steps'][-1]} | {h['entropy']:.2f} | "
                             f"{h['valid_rate']:.2f} | {h['masks']} | {h['distinct_per_100']:.0f} | "
                             f"{h['span_chars']:.1f} | {', '.join(h['top'])} |")
        lines += ["", "p(span) - base on the items whose span the generator chose in training (casefolded) and on the rest",
                  "", "| run | its spans: items | run - base | other items | run - base |", "|---|---:|---:|---:|---:|"]
        for r in pz:
            chosen = {x.casefold() for spans in generator_spans(root / r["name"]).values() for x in spans}
            cells = []
            for keep in (True, False):
                sel = {x["key"] for x in base if (x["span"].strip().casefold() in chosen) == keep}
                part = [x for x in docs[r["name"]]["records"] if x["key"] in sel]
                cells += [str(len(sel)), interval_cell(compare([x for x in base if x["key"] in sel], part, "p"),
                                                       "{:+.4f}") if sel else "–"]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    plot(runs, rows, out.with_suffix(".png"))
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


def plot(runs: list[dict], rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, r in enumerate(runs):
        task = PRED_TASK[arm_of(r["arm"])]
        pts = [(x["step"], x[f"reward/{task}"]) for x in rows[r["name"]] if f"reward/{task}" in x]
        if pts:
            axes[0].plot(*zip(*pts), marker=".", color=f"C{i % 10}", label=r["name"])
        pts = [(x["step"], x["entropy/mask_gen"]) for x in rows[r["name"]] if "entropy/mask_gen" in x]
        if pts:
            axes[1].plot(*zip(*pts), marker=".", color=f"C{i % 10}", label=r["name"])
    axes[0].set(title="predictor reward in training", xlabel="step")
    axes[1].set(title="generator entropy (nats/token)", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=7)
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
    r.add_argument("--save-interval", type=int, default=0, help="steps between saves (0: the final one only)")
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=(*ARMS, *VARIANTS),
                   help="random_span_flip: Random-span on minus the reward (the negative control); "
                        "pretrainzero_repeat: PretrainZero with reward.gen_repeat_penalty")
    r.add_argument("--lrs", type=float, nargs="+", help="a learning-rate sweep (default: the run file's lr)")
    r.add_argument("--paragraphs", type=int, default=2, help="paragraphs a step (train.paragraphs_per_step)")
    r.add_argument("--variant", choices=("restate", "cloze"), default="restate",
                   help="the arms' run files: examples/smollm2_<variant>_<arm>.yaml")
    e = sub.add_parser("eval")
    p = sub.add_parser("report")
    for x in (e, p):
        x.add_argument("root")
        x.add_argument("--split", choices=("valid", "test"), default="test", help="valid: for pilots")
        x.add_argument("--items", type=int, default=1000)
    e.add_argument("--jobs", type=int, default=1)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--runs", nargs="+", help="score only these runs (names as in experiment.json, or base)")
    p.add_argument("--out", default="docs/results/heldout")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "eval": cmd_eval, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
