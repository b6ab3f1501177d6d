"""How many weight versions old a step's samples are, and whether a batch is within ``rollout.max_staleness``.

With rollout/train overlap the rollout of step t+1 runs while step t trains, on the weights of version t; step t+1
then trains policy version t+1 on them: staleness 1. The PPO ratio is taken against the trainer's own recomputed
log-probs and the rollout/trainer gap (here: the weight versions between them plus numerics) is what the
importance weight (``loss.mismatch``: TIS or MIS, ``algo/mismatch.py``) corrects, as in decoupled PPO.

Pure functions over ``Sample.weight_version`` (the engine's version that generated the response; -1 = unknown,
such samples are ABORTED by ``rollout.protocol.fill_sample`` and never trained on) and the trainer's version.
"""
from __future__ import annotations

from collections.abc import Sequence

from megatron_pz.types import Sample


def staleness(sample: Sample, trainer_version: int) -> int | None:
    """Weight versions between the sample's generator and the policy it trains; None when it has no version
    (not generated: teacher-forced ``sft_span`` samples, or an engine that reported none)."""
    if sample.weight_version < 0:
        return None
    return trainer_version - sample.weight_version


def stalest(samples: Sequence[Sample], trainer_version: int) -> int:
    """The largest staleness in ``samples`` (0 when none has a version)."""
    known = [x for s in samples if (x := staleness(s, trainer_version)) is not None]
    return max(known, default=0)


def staleness_metrics(samples: Sequence[Sample], trainer_version: int) -> dict[str, float]:
    """``rollout/staleness_mean``, ``_max``, and the histogram as counts: ``rollout/staleness_<k>`` samples that
    are k versions old, for every k present (metrics.jsonl has no histogram type; TensorBoard gets
    ``hist/staleness`` from ``logs.sample_histograms``)."""
    known = [x for s in samples if (x := staleness(s, trainer_version)) is not None]
    if not known:
        return {}
    out = {"rollout/staleness_mean": sum(known) / len(known), "rollout/staleness_max": float(max(known))}
    for k in sorted(set(known)):
        out[f"rollout/staleness_{k}"] = float(known.count(k))
    return out
