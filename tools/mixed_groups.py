"""Pooled share of GRPO groups with mixed rewards (some right, some wrong) in runs' metrics.jsonl, with a 95 %
Wilson interval.

    python tools/mixed_groups.py runs/coldstart/smollm2_stage2_random_span [more run folders ...]

Reads ``groups/<task>`` and ``groups_mixed/<task>`` (logs/stats.py) of every logged step and sums them per task:
the mixed share is the share of groups DAPO keeps, i.e. the groups GRPO can learn from.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled(run: Path) -> dict[str, tuple[int, int]]:
    """task -> (mixed groups, groups) summed over the run's steps."""
    out: dict[str, tuple[int, int]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, n in row.items():
            if key.startswith("groups/"):
                task = key.split("/", 1)[1]
                k0, n0 = out.get(task, (0, 0))
                out[task] = (k0 + int(row.get(f"groups_mixed/{task}", 0)), n0 + int(n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    for run in ap.parse_args().runs:
        for task, (k, n) in pooled(run).items():
            lo, hi = wilson(k, n)
            print(f"{run}  {task}: {k}/{n} mixed = {k / max(n, 1):.1%}  (95% Wilson {lo:.1%}-{hi:.1%})")


if __name__ == "__main__":
    main()
