"""``python -m benchmarks.saves``: what checkpointing costs a step, saved synchronously and in the background.

    python -m benchmarks.saves             # = --config examples/bench_cpu.yaml --out runs/bench/saves --steps 4
    python -m benchmarks.saves --config FILE --out DIR [--steps N] [--warmup 1] [key=value ...]

Runs our side of the bench workload twice with a checkpoint after every step (``checkpoint.save_interval=1``):
with ``checkpoint.async_save=false``, then ``true``. Per mode, over the steps after ``--warmup`` and before the
last one (a run's last save waits for its write in both modes, as the end of a run must; it is reported apart):
the mean step time, the save phase (what the step waited for: all of the save when synchronous; the collective
part, the fork and the previous save's publication when asynchronous), its share of the step, the other phases'
shares, and the background writer's own time (``time/save_background``). Writes <out>/saves.json and
<out>/saves.md and prints the table. Figures are comparable only at similar load (``uptime`` is recorded).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.compare import DEFAULT_CONFIG, OURS_OVERRIDES, _read_jsonl, run_ours
from megatron_pz.errors import UserError

MODES = {"sync": "checkpoint.async_save=false", "async": "checkpoint.async_save=true"}
PHASES = ("rollout", "train", "sync", "save")


def summarize_modes(rows: dict[str, list[dict[str, Any]]], warmup: int) -> dict[str, dict[str, Any]]:
    """Per mode, from its metrics.jsonl rows: figures over the steps after ``warmup`` and before the last."""
    out = {}
    for mode, rs in rows.items():
        measured = rs[warmup:-1]
        if not measured:
            raise UserError(f"bench saves: no measured step in {mode} mode after {warmup} warm-up step(s) and "
                            f"before the last; raise --steps")
        total = sum(r["time/step"] for r in measured)
        per_phase = {k: sum(r.get(f"time/{k}", 0.0) for r in measured) for k in PHASES}
        # every save of the run (one per step) is published by its end, some two in one step (the last step's
        # row holds the write published during it and its own): total writer time / saves
        written = [r["time/save_background"] for r in rs if "time/save_background" in r]
        out[mode] = {
            "measured_steps": [r["step"] for r in measured],
            "step_s": total / len(measured),
            "save_s": per_phase["save"] / len(measured),
            "share": {k: v / total for k, v in per_phase.items()},
            "background_write_s": sum(written) / len(rs) if written else None,
            "last_step_save_s": rs[-1].get("time/save"),
        }
    return out


def table_rows(s: dict[str, dict[str, Any]]) -> list[list[str]]:
    modes = list(s)
    rows = [["metric", *modes]]
    rows.append(["step time (s)", *[f"{s[m]['step_s']:.2f}" for m in modes]])
    rows.append(["save phase per step (s)", *[f"{s[m]['save_s']:.2f}" for m in modes]])
    for k in PHASES:
        rows.append([f"share: {k}", *[f"{100 * s[m]['share'][k]:.1f} %" for m in modes]])
    rows.append(["background write per save (s)", *[("-" if s[m]["background_write_s"] is None
                                                     else f"{s[m]['background_write_s']:.2f}") for m in modes]])
    rows.append(["last step's save (s, waited for)", *[f"{s[m]['last_step_save_s'] or 0.0:.2f}" for m in modes]])
    return rows


def markdown(s: dict[str, dict[str, Any]]) -> str:
    return markdown_table(table_rows(s))


def markdown_table(rows: list[list[str]]) -> str:
    """A header row and body rows as a Markdown table."""
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] +
                     ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def print_table(rows: list[list[str]]) -> None:
    """The same rows as aligned console columns (first column left, the others right)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def run(args: argparse.Namespace) -> int:
    import subprocess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*args.overrides, f"train.steps={args.steps}"]
    rows, sides = {}, {}
    for mode, key in MODES.items():
        _, sides[mode], run_dir = run_ours(args.config, overrides, out, mode,
                                           [*OURS_OVERRIDES, "checkpoint.save_interval=1", key])
        rows[mode] = _read_jsonl(run_dir / "metrics.jsonl")
    summary = summarize_modes(rows, args.warmup)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    result = {"command": " ".join(["python", "-m", "benchmarks.saves", *sys.argv[1:]]), "commit": commit,
              "summary": summary, "per_step": rows, "sides": sides}
    (out / "saves.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "saves.md").write_text(markdown(summary))
    print_table(table_rows(summary))
    print("load before -> after: " + "; ".join(f"{m} {v['load_before']} -> {v['load_after']}"
                                               for m, v in sides.items()))
    print(f"wrote {out / 'saves.json'} and {out / 'saves.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.saves", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"run file (default {DEFAULT_CONFIG})")
    p.add_argument("--out", default="runs/bench/saves", help="output folder (saves.json, saves.md, logs)")
    p.add_argument("--steps", type=int, default=4, help="steps per mode, warm-up and the last included")
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of the figures")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"python -m benchmarks.saves: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
