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
import sys
from typing import Any

from benchmarks.modes import main as modes_main
from benchmarks.modes import markdown_table, run_modes
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


def run(args: argparse.Namespace) -> int:
    modes = {mode: ["checkpoint.save_interval=1", key] for mode, key in MODES.items()}
    return run_modes("saves", args, modes, summarize_modes, table_rows)


def main(argv: list[str] | None = None) -> int:
    return modes_main("saves", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
