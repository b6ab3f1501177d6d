"""Evaluation reports: one JSON per suite (config, metrics, per-item records) and a Markdown table."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_pz.eval.runner import SuiteResult


def _fmt_pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def table_rows(results: Sequence[SuiteResult]) -> list[list[str]]:
    rows = []
    for r in results:
        m, c = r.metrics, r.config
        k = int(m.get("samples", 1))
        rows.append([
            r.suite,
            f"{'mean' if k > 1 else 'acc'}@{k}" if k > 1 else "acc (greedy)" if c.get("temperature") == 0 else "acc",
            _fmt_pct(m.get("accuracy")),
            _fmt_pct(m.get("lenient_accuracy")),
            _fmt_pct(m.get(f"pass@{k}")) if k > 1 else "–",
            str(int(m.get("n", 0))),
            f"{m.get('mean_response_tokens', 0):.0f}",
            _fmt_pct(m.get("truncated_rate")),
            _fmt_pct(m.get("no_answer_rate")),
            f"{m.get('seconds', 0):.0f}",
        ])
    return rows


HEADER = ["suite", "metric", "accuracy %", "lenient %", "pass@k %", "n", "resp. tokens", "truncated %",
          "no answer %", "time s"]


def markdown_table(results: Sequence[SuiteResult]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in
                                                              range(len(HEADER))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def text_table(results: Sequence[SuiteResult]) -> str:
    rows = [HEADER] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_reports(results: Sequence[SuiteResult], out: str | Path, header: dict[str, Any] | None = None) -> Path:
    """Write ``<out>/eval_<suite>.json`` for each result and ``<out>/eval_report.md``; returns the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        doc = {"suite": r.suite, "model": dict(header or {}), "config": r.config, "metrics": r.metrics,
               "records": r.records}
        _atomic_write(out / f"eval_{r.suite}.json", json.dumps(doc, indent=1, ensure_ascii=False, default=str))
    lines = ["# Evaluation report", ""]
    for k, v in (header or {}).items():
        lines.append(f"- {k}: `{v}`")
    lines += ["", markdown_table(results), "", "Settings per suite:", ""]
    for r in results:
        c = r.config
        lines.append(f"- `{r.suite}`: data {c['data']}, limit {c['limit']}, k={c['samples']}, temperature "
                     f"{c['temperature']}, top_p {c['top_p']}, max_new_tokens {c['max_new_tokens']}, seed "
                     f"{c['seed']}, prompt style {c['prompt_style']}, checker {c.get('checker', 'not recorded')}"
                     + (f", {int(r.metrics['skipped_too_long'])} item(s) skipped (too long)"
                        if r.metrics.get("skipped_too_long") else "")
                     + (f", {int(r.metrics['checker_timeouts'])} answer(s) without a verdict in time (scored wrong)"
                        if r.metrics.get("checker_timeouts") else ""))
    lines += ["", "Accuracy is mean@k over k samples per item (greedy accuracy for k = 1); span suites also give "
              "the lenient exact match. Maths answers (the last `\\boxed{}`, else \"The answer is\", else `####`) "
              "are compared with the gold answer by the checker named above: Math-Verify, or the light checker "
              "(`megatron_pz/eval/extract.py`, no symbolic equivalence) where Math-Verify is not installed.", ""]
    path = out / "eval_report.md"
    _atomic_write(path, "\n".join(lines))
    return path
