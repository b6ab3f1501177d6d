"""The harness of benchmarks that run our side of the bench workload once per mode and tabulate the modes side by
side (``benchmarks.saves``: sync/async checkpoints; ``benchmarks.overlap``: on-policy/overlapped rollout).

A mode is a list of config overrides on top of ``benchmarks.compare``'s (Random-span, no DAPO filter, no saves).
Each benchmark supplies its modes, its summary of the metrics rows and its table rows; this module runs the modes,
writes ``<out>/<name>.json`` (command, commit, summary, per-step rows, the sides' load and memory) and
``<out>/<name>.md``, and prints the table with the load before and after each mode.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks.compare import DEFAULT_CONFIG, OURS_OVERRIDES, _read_jsonl, run_ours
from megatron_pz.errors import UserError

Summary = dict[str, dict[str, Any]]


def markdown_table(rows: list[list[str]]) -> str:
    """A header row and body rows as a Markdown table."""
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] +
                     ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def print_table(rows: list[list[str]]) -> None:
    """The same rows as aligned console columns (first column left, the others right)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def run_modes(name: str, args: argparse.Namespace, modes: dict[str, list[str]],
              summarize: Callable[[dict[str, list[dict[str, Any]]], int], Summary],
              table_rows: Callable[[Summary], list[list[str]]]) -> int:
    """Run every mode (one training run each, ``args.steps`` steps), then write and print the comparison."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*args.overrides, f"train.steps={args.steps}"]
    rows, sides = {}, {}
    for mode, extra in modes.items():
        _, sides[mode], run_dir = run_ours(args.config, overrides, out, mode.replace("-", "_"),
                                           [*OURS_OVERRIDES, *extra])
        rows[mode] = _read_jsonl(run_dir / "metrics.jsonl")
    summary = summarize(rows, args.warmup)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    result = {"command": " ".join(["python", "-m", f"benchmarks.{name}", *sys.argv[1:]]), "commit": commit,
              "summary": summary, "per_step": rows, "sides": sides}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown_table(table_rows(summary)))
    print_table(table_rows(summary))
    print("load before -> after: " + "; ".join(f"{m} {v['load_before']} -> {v['load_after']}"
                                               for m, v in sides.items()))
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}")
    return 0


def main(name: str, doc: str, run: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """``python -m benchmarks.<name>``: the shared flags (config, out, steps, warmup, overrides), one-line errors."""
    prog = f"python -m benchmarks.{name}"
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"run file (default {DEFAULT_CONFIG})")
    p.add_argument("--out", default=f"runs/bench/{name}", help=f"output folder ({name}.json, {name}.md, logs)")
    p.add_argument("--steps", type=int, default=4, help="steps per mode, warm-up and the last included")
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of the figures")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
