"""The training objectives (``train.objective``): one record each, in one registry.

Everything that differs between objectives outside their sample builders (``data/tasks.py``,
``data/next_token.py``) and collectors (``trainer/collect.py``, one per entry) is an attribute of its
``Objective``: callers read ``objective_of(cfg.train).supervised`` instead of comparing names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_pz.errors import ConfigError


@dataclass(frozen=True)
class Objective:
    """What one objective trains and what follows from it for the configuration, planner and trainer."""

    name: str
    label: str
    """What it trains, in one line (with the paper section)."""
    group_sizes: tuple[str, ...]
    """The ``TrainConfig`` fields that are GRPO group sizes (each must be >= 2; a group of one has zero variance)."""
    per_paragraph: str
    """What ``train.masks_per_paragraph`` counts, in the console's words ("masks", "spans", ...)."""
    masks_spans: bool
    """Spans are masked with ``span.mask_token`` (so the corpus drops paragraphs that already hold it)."""
    generator: bool = False
    """A mask-generation task: per paragraph, ``masks_per_paragraph`` generator samples besides the predictor's."""
    supervised: bool = False
    """Teacher-forced cross-entropy on given answers: no rollout, no reward, no advantages."""
    shared_prompts: bool = True
    """Samples share prompts (GRPO groups), so shared-prompt rows (``train.shared_prompt``) can hold them."""


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("pretrainzero", "mask generation + prediction [PZ §3.2]",
              group_sizes=("masks_per_paragraph", "predictions_per_mask"), per_paragraph="masks",
              masks_spans=True, generator=True),
    Objective("random_span", "Random-span RLPT baseline [PZ §4.2]",
              group_sizes=("predictions_per_mask",), per_paragraph="spans", masks_spans=True),
    Objective("rpt", "RPT entropy next-token baseline [PZ §3.1]",
              group_sizes=("predictions_per_mask",), per_paragraph="next-token positions", masks_spans=False),
    Objective("sft_span", "supervised warm-up on random spans (cold start; a deviation, cf. RLPT's SFT [method §5.2])",
              group_sizes=(), per_paragraph="supervised spans", masks_spans=True, supervised=True,
              shared_prompts=False),
)}
"""Every objective by name; ``trainer.collect.COLLECTORS`` has one collector each."""


def check_objective(name: str, key: str = "train.objective") -> str:
    """``name`` if it is an objective, else a ConfigError naming ``key`` and the choices."""
    if name in OBJECTIVES:
        return name
    *first, last = OBJECTIVES
    raise ConfigError(f"{key} must be {', '.join(first)} or {last}, got {name!r}")


def objective_of(train: Any) -> Objective:
    """The record of ``train.objective`` (``train``: a ``TrainConfig`` or anything with an ``objective`` name)."""
    return OBJECTIVES[check_objective(train.objective)]
