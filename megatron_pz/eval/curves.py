"""Learning curves of training runs from their ``metrics.jsonl``: the table and the plot of docs/results.md.

``load_metrics`` reads a run's lines (a resumed run may repeat a step: the last line of a step wins, as the
logger truncates on resume anyway); ``eval_table`` lists every periodic-eval point of several runs; ``plot_runs``
draws eval accuracy, the predictor's training reward and the generator's statistics against the step.

    python tools/plot_experiment.py runs/experiments/smollm2_pretrainzero runs/experiments/smollm2_random_span \\
        --out docs/results
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from megatron_pz.errors import DataError

# (metric key, column title) of the periodic-eval table, in order.
EVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("eval/wiki_span/accuracy", "wiki_span acc"),
    ("eval/wiki_span/lenient_accuracy", "wiki_span lenient"),
    ("eval/squad_span/accuracy", "squad_span acc"),
    ("eval/squad_span/lenient_accuracy", "squad_span lenient"),
    ("eval/wiki_span/mean_response_tokens", "wiki_span tokens"),
)
# The predictor's training reward under each objective (exact-match accuracy of that step's rollouts; for rpt
# the byte-prefix match of the next token).
TRAIN_REWARD_KEYS = ("acc/mask_pred", "reward/random_span", "reward/next_token")


def load_metrics(run_dir: str | Path) -> list[dict]:
    """One dict per logged step of ``<run_dir>/metrics.jsonl``, sorted by step; later lines replace earlier ones."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics file (is {run_dir} a training run's output_dir?)")
    rows: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{n}: not a metrics line ({exc})") from None
        rows[step] = {**rows.get(step, {}), **row}
    return [rows[s] for s in sorted(rows)]


def series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that carry a finite number under ``key``."""
    pts = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def eval_table(runs: dict[str, Sequence[dict]]) -> str:
    """Markdown table: one row per (run, eval step) with the ``EVAL_COLUMNS`` present in any row."""
    cols = [(k, t) for k, t in EVAL_COLUMNS if any(k in r for rows in runs.values() for r in rows)]
    lines = ["| run | step | " + " | ".join(t for _, t in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, rows in runs.items():
        for r in rows:
            if not any(k in r for k, _ in cols):
                continue
            cells = [_fmt(r.get(k), k) for k, _ in cols]
            lines.append(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: object, key: str) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:.1f}" if key.endswith("tokens") else f"{100 * v:.1f} %"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(runs: dict[str, Sequence[dict]], png: str | Path, smooth: int = 4) -> Path:
    """2x2 figure: eval wiki_span / squad_span accuracy; predictor training reward; generator mask statistics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    # Curves of different runs may coincide (a null result draws them all on 0): dash and mark each run apart.
    styles = [dict(linestyle=ls, marker=mk) for ls, mk in (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))]
    style = {name: styles[i % len(styles)] for i, name in enumerate(runs)}
    for ax, key, title in ((axes[0][0], "eval/wiki_span/accuracy", "held-out random spans (wiki_span), greedy"),
                           (axes[0][1], "eval/squad_span/accuracy", "SQuAD answer spans (squad_span), greedy")):
        for name, rows in runs.items():
            x, y = series(rows, key)
            ax.plot(x, [100 * v for v in y], label=name, **style[name])
        ax.set(title=title, xlabel="step", ylabel="exact match (%)")
        _floor(ax)
        ax.legend(fontsize=8)
    ax = axes[1][0]
    for name, rows in runs.items():
        for key in TRAIN_REWARD_KEYS:
            x, y = series(rows, key)
            if x:
                ax.plot(x, [100 * v for v in moving_average(y, smooth)], label=f"{name}: {key}",
                        linestyle=style[name]["linestyle"])
    ax.set(title=f"predictor reward on its training spans ({smooth}-step mean)", xlabel="step",
           ylabel="exact match (%)")
    _floor(ax)
    ax.legend(fontsize=8)
    ax = axes[1][1]
    for name, rows in runs.items():
        for key, label in (("mask/valid_rate", "valid-mask rate"), ("reward/mask_gen", "generator reward")):
            x, y = series(rows, key)
            if x:
                ax.plot(x, moving_average(y, smooth), label=f"{name}: {label}", linestyle=style[name]["linestyle"])
    ax.set(title=f"generator ({smooth}-step mean)", xlabel="step", ylabel="rate / reward")
    ax.legend(fontsize=8)
    _floor(ax, top=1.0)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _floor(ax, top: float = 10.0) -> None:
    """Start the y axis just below 0 and show at least up to ``top``, so an all-zero curve reads as a floor."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(-0.02 * max(hi, top), max(hi, top))
