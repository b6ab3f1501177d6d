"""The scaling sweep's figure: throughput, step-time breakdown, memory (predicted vs measured), MFU."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_pz.errors import UserError

MEM_PARTS = [("pred_params_gib", "params"), ("pred_grads_gib", "grads"), ("pred_optimizer_gib", "optimizer"),
             ("pred_activations_gib", "activations"), ("pred_logits_gib", "logits")]


def _f(row: dict[str, Any], key: str) -> float:
    v = row.get(key)
    return float(v) if v not in (None, "") else 0.0


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Four panels over the points that were planned or measured; rejected points are left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib (pip install matplotlib, or the [dev] extra)") from None
    shown = [r for r in rows if r.get("status") in ("ok", "planned")]
    ok = [r for r in shown if r.get("status") == "ok"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_tok, ax_time), (ax_mem, ax_mfu) = axes

    def labels(rs):
        return [r["label"].replace(" mbs", "\nmbs") for r in rs]

    if ok:
        x = range(len(ok))
        ax_tok.bar(x, [_f(r, "tokens_per_s_per_gpu") for r in ok], color="#4C72B0")
        ax_tok.set_xticks(list(x), labels(ok), fontsize=8)
        bottom = [0.0] * len(ok)
        for key, name, color in (("fwd_bwd_s", "forward+backward", "#4C72B0"),
                                 ("grad_sync_s", "grad sync", "#DD8452"), ("optimizer_s", "optimizer", "#55A868")):
            vals = [_f(r, key) for r in ok]
            ax_time.bar(x, vals, bottom=bottom, label=name, color=color)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax_time.set_xticks(list(x), labels(ok), fontsize=8)
        ax_time.legend(fontsize=8)
        has_mfu = any(r.get("mfu") not in (None, "") for r in ok)
        key = "mfu" if has_mfu else "achieved_tflops_per_gpu"
        ax_mfu.bar(x, [_f(r, key) * (100 if has_mfu else 1) for r in ok], color="#8172B3")
        ax_mfu.set_xticks(list(x), labels(ok), fontsize=8)
        src = ok[0].get("peak_source") or ""
        ax_mfu.set_ylabel(f"MFU % (peak: {src})" if has_mfu else "achieved model TFLOP/s per GPU")
    else:
        for ax in (ax_tok, ax_time, ax_mfu):
            ax.text(0.5, 0.5, "not measured (dry run)", ha="center", va="center", transform=ax.transAxes)
    ax_tok.set_ylabel("tokens/s per GPU (rank)")
    ax_tok.set_title("throughput")
    ax_time.set_ylabel("seconds per step")
    ax_time.set_title("step time breakdown")
    ax_mfu.set_title("model FLOPs utilisation")

    x = range(len(shown))
    bottom = [0.0] * len(shown)
    for key, name in MEM_PARTS:
        vals = [_f(r, key) for r in shown]
        ax_mem.bar(x, vals, bottom=bottom, label=f"predicted {name}")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    meas = [(i, _f(r, "measured_peak_mem_gib")) for i, r in enumerate(shown) if _f(r, "measured_peak_mem_gib")]
    if meas:
        ax_mem.scatter([i for i, _ in meas], [m for _, m in meas], marker="D", color="black", zorder=3,
                       label="measured peak")
    ax_mem.set_xticks(list(x), labels(shown), fontsize=8)
    ax_mem.set_ylabel("GiB per GPU (rank), without fixed overhead")
    ax_mem.set_title("memory: planner vs measured")
    ax_mem.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
