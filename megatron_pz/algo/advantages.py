"""Group-relative (GRPO) advantages per ``group_id``, with DAPO's filter of zero-variance groups.

Groups [PZ §3.3, Eq. 10]: a generator group is the masks of one paragraph, a predictor group the answers to one
mask; both are normalised the same way:

    A_i = (r_i - mean(r)) / (std(r) + eps)        std with ``ddof`` (0 = population, the default)
    A_i =  r_i - mean(r)                           when ``std_normalize`` is off (Dr. GRPO style)

Only generated Samples (COMPLETED/TRUNCATED) with a reward take part; others keep ``advantage = None``.
DAPO dynamic-sampling filter [PZ §4.1, DAPO]: a group whose rewards are all exactly equal (accuracy 0.0 or 1.0
for predictors; all-equal r_gen for generators; any single-sample group) has zero advantage everywhere; with
``dapo_filter`` its Samples get ``status = FILTERED`` and contribute no tokens to the loss. Filtered groups are
not re-sampled (INFERENCE, method §6 item 7). Invalid masks stay in their generator group with reward 0.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_pz.errors import ConfigError
from megatron_pz.types import Sample, Status


@dataclass
class AdvantageConfig:
    """How rewards become advantages."""

    std_normalize: bool = True
    """Divide by the group std [PZ Eq. 10]; False = mean-centred only (Dr. GRPO)."""
    eps: float = 1e-6
    """Added to the std (guards groups with tiny spread; unknown in the paper, method §6 item 18)."""
    ddof: int = 0
    """Std degrees of freedom: 0 = population std (default), 1 = sample std."""
    dapo_filter: bool = True
    """Drop groups whose rewards are all equal (status FILTERED) [PZ §4.1 "Following DAPO"]."""

    def __post_init__(self) -> None:
        if not isinstance(self.eps, (int, float)) or self.eps < 0:
            raise ConfigError(f"AdvantageConfig.eps={self.eps!r}: expected a number >= 0")
        if self.ddof not in (0, 1):
            raise ConfigError(f"AdvantageConfig.ddof={self.ddof!r}: expected 0 or 1")
        if self.std_normalize and self.eps == 0:
            raise ConfigError("AdvantageConfig.eps=0 with std_normalize: zero-variance groups would divide by 0")


def group_advantages(rewards: Sequence[float], cfg: AdvantageConfig) -> list[float]:
    """GRPO advantages of one group [PZ Eq. 10]: ``(r - mean) / (std + eps)`` or ``r - mean``."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    centred = [r - mean for r in rewards]
    if not cfg.std_normalize:
        return centred
    dof = n - cfg.ddof
    std = math.sqrt(sum(c * c for c in centred) / dof) if dof > 0 else 0.0
    return [c / (std + cfg.eps) for c in centred]


def compute_advantages(samples: Sequence[Sample], cfg: AdvantageConfig) -> dict[str, float]:
    """Set ``advantage`` (and ``status=FILTERED`` for zero-variance groups) on every Sample, grouped by group_id.

    Returns metrics: number of groups, fraction filtered, fraction of participating samples kept.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.status in (Status.COMPLETED, Status.TRUNCATED) and s.reward is not None:
            groups[s.group_id].append(s)
        else:
            s.advantage = None
    filtered = kept = 0
    for members in groups.values():
        rewards = [float(s.reward) for s in members]  # type: ignore[arg-type]
        if cfg.dapo_filter and max(rewards) == min(rewards):
            filtered += 1
            for s in members:
                s.advantage = 0.0
                s.status = Status.FILTERED
            continue
        for s, a in zip(members, group_advantages(rewards, cfg), strict=True):
            s.advantage = a
            kept += 1
    n_groups = len(groups)
    n_samples = sum(len(m) for m in groups.values())
    return {
        "groups": float(n_groups),
        "groups_filtered_frac": filtered / n_groups if n_groups else 0.0,
        "samples_kept_frac": kept / n_samples if n_samples else 0.0,
    }
