"""The comparison's figures (pure): per-step rows -> means, ratios ours/TRL, and the text / markdown tables."""
from __future__ import annotations

from typing import Any

from megatron_pz.errors import UserError


def mean(xs: list[float]) -> float:
    """The arithmetic mean; NaN for no values."""
    return sum(xs) / len(xs) if xs else float("nan")


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ours_steps(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-step phase times and token counts from our metrics.jsonl rows."""
    out = []
    background = 0.0  # rollout.max_staleness: this step's batch was generated during the previous step
    for r in rows:
        step = r.get("time/step", 0.0)
        gen_tokens = sum(r.get(f"count/{t}", 0.0) * r.get(f"length/{t}_mean", 0.0)
                         for t in ("random_span", "mask_pred", "mask_gen"))
        phases = {k: r.get(f"time/{k}", 0.0) for k in ("rollout", "train", "sync", "save")}
        out.append({"step": r["step"], "step_s": step, "step_no_save_s": step - phases["save"],
                    **{f"{k}_s": v for k, v in phases.items()},
                    "idle_s": step - sum(phases.values()), "generated_tokens": gen_tokens,
                    # the wall time that generated this step's samples: its rollout phase, plus with rollout/train
                    # overlap the background rollout logged by the previous step (the phase is then ~0)
                    "generating_s": phases["rollout"] + background,
                    # throughput/tokens_per_s = prompt + response tokens of the step's samples / time/step
                    "trained_tokens": r.get("throughput/tokens_per_s", 0.0) * step,
                    "loss_tokens": r.get("train/tokens", 0.0),
                    # the matmul FLOPs the trainer ran, as laid out (shared prompts once); None from older runs
                    "train_flops": r.get("train/flops")})
        background = r.get("time/rollout_background", 0.0)
    return out


def summarize(ours: list[dict[str, float]], trl: list[dict[str, float]] | None, gen: list[dict[str, float]] | None,
              *, warmup: int, params: int, matmul_gflops: float, peak_rss: dict[str, int]) -> dict[str, Any]:
    """The bench's figures and ratios from measured per-step rows (steps after ``warmup`` only)."""
    o = ours[warmup:]
    if not o:
        raise UserError(f"bench: no measured steps after {warmup} warm-up step(s); raise --steps")
    ours_s = {**_side_summary(o, "step_no_save_s", peak_rss.get("ours", 0)),
              "step_with_save_s": mean([r["step_s"] for r in o]), "sync_s": mean([r["sync_s"] for r in o])}
    step_total = sum(r["step_s"] for r in o)
    ours_s["share"] = {k: _div(sum(r[f"{k}_s"] for r in o), step_total)
                       for k in ("rollout", "train", "sync", "save", "idle")}
    train_s = max(sum(r["train_s"] for r in o), 1e-12)
    if all(r.get("train_flops") is not None for r in o):
        # executed: the micro-batches as the trainer laid them out (train.py executed_flops), so a shared prompt
        # counts once per micro-batch, padding counts as run, attention as the rows' masks allow
        flops, ours_s["train_flops_source"] = sum(r["train_flops"] for r in o) / train_s, "executed"
    else:  # metrics without train/flops: the dense 6NT rule on the unshared prompt + response tokens
        flops, ours_s["train_flops_source"] = 6.0 * params * sum(r["trained_tokens"] for r in o) / train_s, "6NT"
    ours_s["train_flops_per_s"] = flops
    ours_s["train_flops_over_matmul"] = _div(flops, matmul_gflops * 1e9)
    out: dict[str, Any] = {"warmup_steps": warmup, "measured_steps": len(o), "params": params,
                           "matmul_gflops": matmul_gflops, "ours": ours_s}
    if trl is not None:
        t = trl[warmup:]
        if not t:
            raise UserError("bench: TRL reported no steps after the warm-up")
        trl_s = _side_summary(t, "step_s", peak_rss.get("trl", 0))
        out["trl"] = trl_s
        out["ratio_ours_over_trl"] = {k: _div(ours_s[k], trl_s[k]) for k in
                                      ("step_s", "rollout_tokens_per_s", "train_tokens_per_s", "peak_rss_bytes")}
    if gen is not None:
        g = gen[warmup:] or gen
        g_tps = _div(sum(r["generated_tokens"] for r in g), sum(r["generate_s"] for r in g))
        out["generate"] = {"tokens_per_s": g_tps, "peak_rss_bytes": peak_rss.get("generate", 0)}
        out["ours"]["rollout_over_generate"] = _div(ours_s["rollout_tokens_per_s"], g_tps)
    return out


def _side_summary(rows: list[dict[str, Any]], step_key: str, peak_bytes: int) -> dict[str, float]:
    """The figures both sides report, over their measured steps: mean step time (``step_key``), generated tokens per
    rollout second, trained tokens per train second, peak memory, and the mean token counts."""
    return {
        "step_s": mean([r[step_key] for r in rows]),
        "rollout_tokens_per_s": _div(sum(r["generated_tokens"] for r in rows),
                                     sum(r.get("generating_s", r["rollout_s"]) for r in rows)),
        "train_tokens_per_s": _div(sum(r["trained_tokens"] for r in rows), sum(r["train_s"] for r in rows)),
        "peak_rss_bytes": peak_bytes,
        "generated_tokens": mean([r["generated_tokens"] for r in rows]),
        "trained_tokens": mean([r["trained_tokens"] for r in rows]),
    }


# ------------------------------------------------------------------------------------------- tables
_ROWS = [("step time (s, lower is better)", "step_s", "{:.2f}"),
         ("rollout tokens/s", "rollout_tokens_per_s", "{:.1f}"),
         ("train tokens/s", "train_tokens_per_s", "{:.1f}"),
         ("peak memory (GB, sum of per-process peaks)", "peak_rss_bytes", "{:.2f}")]


def _fmt(key: str, fmt: str, v: Any) -> str:
    if v is None:
        return "-"
    return fmt.format(v / 1e9 if key == "peak_rss_bytes" else v)


def table_rows(s: dict[str, Any]) -> list[list[str]]:
    trl, ratio = s.get("trl", {}), s.get("ratio_ours_over_trl", {})
    rows = [["metric", "megatron_pz", "TRL GRPOTrainer", "ours / TRL"]]
    for label, key, fmt in _ROWS:
        rows.append([label, _fmt(key, fmt, s["ours"].get(key)), _fmt(key, fmt, trl.get(key)),
                     f"{ratio[key]:.2f}" if key in ratio else "-"])
    return rows


def extra_lines(s: dict[str, Any]) -> list[str]:
    o = s["ours"]
    how = ("matmul FLOPs of the micro-batches as run, shared prompts once / train time"
           if o.get("train_flops_source") == "executed" else
           f"6 x {s['params'] / 1e6:.1f}M params x trained tokens / train time")
    lines = [(f"train FLOP/s ({how}): {o['train_flops_per_s'] / 1e9:.2f} GFLOP/s = "
              f"{100 * o['train_flops_over_matmul']:.1f}% of measured fp32 matmul {s['matmul_gflops']:.1f} GFLOP/s")]
    if "generate" in s:
        lines.append(f"rollout tokens/s over plain transformers generate: {o['rollout_tokens_per_s']:.1f} / "
                     f"{s['generate']['tokens_per_s']:.1f} = {o['rollout_over_generate']:.2f}")
    lines.append(f"weight sync: {o['sync_s']:.2f} s per step")
    sh = o["share"]
    lines.append("share of our step (with save): " + ", ".join(f"{k} {100 * sh[k]:.1f}%" for k in sh))
    if "pretrainzero" in s:
        p = s["pretrainzero"]
        flops = (f"train {p['train_flops_per_s'] / 1e9:.2f} GFLOP/s executed, " if "train_flops_per_s" in p
                 else "")
        lines.append(f"full PretrainZero step (ours): {p['step_s']:.2f} s (with save {p['step_with_save_s']:.2f}), "
                     f"rollout {p['rollout_tokens_per_s']:.1f} tok/s, {p.get('loss_tokens', 0):.0f} trained response "
                     f"tokens per step, {flops}shares " +
                     ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["share"].items()))
    return lines


def text_table(s: dict[str, Any]) -> str:
    rows = table_rows(s)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out + [""] + extra_lines(s))


def markdown_table(s: dict[str, Any]) -> str:
    rows = table_rows(s)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * 4]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(md + [""] + [f"- {x}" for x in extra_lines(s)]) + "\n"
