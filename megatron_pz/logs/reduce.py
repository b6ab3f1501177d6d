"""One step's metrics, reduced on rank 0 from what every rank reported (pure): the mean over the ranks that
report a metric, then the statistics of every data owner's samples (``logs.stats``), then the throughput."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_pz.logs.stats import sample_scalars
from megatron_pz.types import Sample


def reduce_step(gathered: Sequence[tuple[dict[str, float], list[Sample]]],
                extra: dict[str, float] | None = None) -> tuple[dict[str, float], list[Sample]]:
    """``gathered[r]`` = rank r's (metrics, samples; [] unless a data owner) -> (scalars, all samples).

    ``extra``: rank 0's own figures (weight version, counters) added as they are. ``throughput/tokens_per_s`` is
    every sample's prompt + response tokens over ``time/step``; ``data/paragraphs`` counts distinct paragraphs."""
    samples = [s for _, ss in gathered for s in ss]
    merged: dict[str, list[float]] = {}
    for metrics, _ in gathered:
        for k, v in metrics.items():
            merged.setdefault(k, []).append(float(v))
    scalars: dict[str, Any] = {k: sum(v) / len(v) for k, v in merged.items()}
    scalars.update(sample_scalars(samples))
    scalars.update(extra or {})
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    scalars["throughput/tokens_per_s"] = tokens / max(scalars.get("time/step", 0.0), 1e-9)
    scalars["data/paragraphs"] = float(len({s.metadata.get("paragraph_id") for s in samples}))
    return scalars, samples


def paragraph_ids(samples: Sequence[Sample]) -> list[str]:
    """The paragraphs a step trained on, sorted (``data_order.jsonl``)."""
    return sorted({str(s.metadata.get("paragraph_id")) for s in samples})
