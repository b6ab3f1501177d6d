"""One step's Samples -> the task metrics (scalars and distributions). Pure: runs on any rank, no I/O."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from megatron_pz.types import Sample, Status, Task

GENERATED = (Status.COMPLETED, Status.TRUNCATED, Status.FILTERED)
"""Statuses of samples that went through generation (FILTERED is only set after it, by the DAPO filter)."""


def by_task(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by task value (``"mask_gen"``, ...), in order of first appearance."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[Task(s.task).value].append(s)
    return groups


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values)


def sample_scalars(samples: Sequence[Sample]) -> dict[str, float]:
    """Task metrics of one step's Samples. A key whose sample set is empty is left out (not written as 0).

    Per task ``t`` (over all its samples unless said otherwise):
      ``count/t``; ``reward/t`` (mean over samples with a reward); ``length/t_mean``, ``length/t_max``
      (response tokens of generated samples: COMPLETED, TRUNCATED, FILTERED); ``trunc_rate/t`` (status
      TRUNCATED, or finish_reason "length" for a truncated sample the DAPO filter later marked FILTERED);
      ``abort_rate/t``; ``filtered_frac/t``; ``groups/t`` (GRPO groups with a scored generated sample),
      ``groups_mixed/t`` (of those, groups whose rewards are not all equal: the ones DAPO keeps and GRPO learns
      from) and ``groups_mixed_frac/t`` (their share). Counts, so shares can be pooled over steps with their n.
      ``entropy/t``: mean of -log pi_rollout over the generated response tokens, an unbiased estimate of the
      per-token entropy of the distribution sampled from (tokens are drawn from it; the recorded log-probs are
      of that tempered distribution). A collapse shows as entropy falling towards 0.
      ``trained_tokens/t``: response tokens of the samples that enter the policy loss (``Sample.trainable``: generated,
      with an advantage, not DAPO-filtered), summed over the ranks' samples; the tasks' values add up to the step's
      loss tokens (``train/tokens`` on one rank).
    Generator (MASK_GEN metadata set by ``data.tasks.prediction_samples``): ``mask/valid_rate`` over samples
    that carry ``mask_valid``; ``mask/span_words_mean``, ``mask/span_chars_mean`` over valid spans.
    Predictor: ``acc/mask_pred`` = mean MASK_PRED reward (exact match, so the accuracy).
    """
    out: dict[str, float] = {}
    for t, group in by_task(samples).items():
        n = len(group)
        out[f"count/{t}"] = float(n)
        rewards = [float(s.reward) for s in group if s.reward is not None]
        if rewards:
            out[f"reward/{t}"] = _mean(rewards)
        lengths = [len(s.response_ids) for s in group if s.status in GENERATED]
        if lengths:
            out[f"length/{t}_mean"] = _mean(lengths)
            out[f"length/{t}_max"] = float(max(lengths))
        token_logps = [lp for s in group if s.status in GENERATED for lp in s.rollout_logprobs]
        if token_logps:
            out[f"entropy/{t}"] = -_mean(token_logps)
        out[f"trained_tokens/{t}"] = float(sum(len(s.response_ids) for s in group if s.trainable))
        truncated = sum(s.status is Status.TRUNCATED or s.finish_reason == "length" for s in group)
        out[f"trunc_rate/{t}"] = truncated / n
        out[f"abort_rate/{t}"] = sum(s.status is Status.ABORTED for s in group) / n
        out[f"filtered_frac/{t}"] = sum(s.status is Status.FILTERED for s in group) / n
        scored: dict[str, list[float]] = defaultdict(list)
        for s in group:
            if s.reward is not None and s.status in GENERATED:
                scored[s.group_id].append(float(s.reward))
        if scored:
            mixed = sum(max(r) != min(r) for r in scored.values())
            out[f"groups/{t}"] = float(len(scored))
            out[f"groups_mixed/{t}"] = float(mixed)
            out[f"groups_mixed_frac/{t}"] = mixed / len(scored)
        if t == Task.MASK_PRED.value and rewards:
            out["acc/mask_pred"] = out[f"reward/{t}"]

    gens = [s for s in samples if s.task == Task.MASK_GEN]
    validity = [bool(s.metadata["mask_valid"]) for s in gens if "mask_valid" in s.metadata]
    if validity:
        out["mask/valid_rate"] = _mean(validity)
    spans = [s.metadata.get("span") for s in gens if s.metadata.get("mask_valid")]
    spans = [span for span in spans if isinstance(span, str)]
    if spans:
        out["mask/span_words_mean"] = _mean([len(span.split()) for span in spans])
        out["mask/span_chars_mean"] = _mean([len(span) for span in spans])
    return out


def sample_histograms(samples: Sequence[Sample]) -> dict[str, list[float]]:
    """Distributions of one step: ``hist/reward_mask_gen`` (generator rewards), ``hist/length_<task>`` (response
    tokens of generated samples) and ``hist/staleness`` (with rollout/train overlap). Empty ones are left out."""
    out: dict[str, list[float]] = {}
    gen_rewards = [float(s.reward) for s in samples if s.task == Task.MASK_GEN and s.reward is not None]
    if gen_rewards:
        out["hist/reward_mask_gen"] = gen_rewards
    stale = [float(s.metadata["staleness"]) for s in samples if "staleness" in s.metadata]
    if stale:  # rollout.max_staleness > 0: weight versions between each sample's generator and the trained policy
        out["hist/staleness"] = stale
    for t, group in by_task(samples).items():
        lengths = [float(len(s.response_ids)) for s in group if s.status in GENERATED]
        if lengths:
            out[f"hist/length_{t}"] = lengths
    return out
