#!/usr/bin/env python3
"""Table and plot of training runs' learning curves (docs/results.md).

    python tools/plot_experiment.py runs/experiments/smollm2_pretrainzero runs/experiments/smollm2_random_span \
        --out docs/results/curves
writes <out>.png and <out>.md (the periodic-eval table) and prints the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_pz.errors import UserError
from megatron_pz.eval.curves import eval_table, load_metrics, plot_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="training output_dir(s); the folder name labels the curve")
    p.add_argument("--out", default="docs/results/curves", help="output path without extension")
    p.add_argument("--smooth", type=int, default=4, help="moving-average window of the training curves")
    args = p.parse_args(argv)
    try:
        runs = {Path(r).name: load_metrics(r) for r in args.runs}
    except UserError as exc:
        print(f"plot_experiment: error: {exc}", file=sys.stderr)
        return 2
    table = eval_table(runs)
    out = Path(args.out)
    png = plot_runs(runs, out.with_suffix(".png"), smooth=args.smooth)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {png} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
