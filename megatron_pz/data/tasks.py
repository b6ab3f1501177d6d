"""Build ``Sample`` records for each objective: PretrainZero generation/prediction and the two baselines.

Objectives (``OBJECTIVES``; the run picks one with ``train.objective``, and the GRPO group sizes are
``train.masks_per_paragraph`` and ``train.predictions_per_mask``):
  * ``"pretrainzero"``: paragraph -> ``n`` generator Samples (one GRPO group); each valid generator output ->
    ``n`` predictor Samples (one group per mask) [PZ §3.2, §4.1].
  * ``"random_span"``: Random-span RLPT: paragraph -> random whole-word span -> ``n`` predictor Samples with the
    same prediction prompt and reward [PZ §3.1, §4.2 baseline 4].
  * ``"next_token"``: RPT-style next-token reasoning at high-entropy positions, byte-prefix reward
    [PZ §3.1 "Entropy-based Next Token Reasoning"; RPT §2]. Its builders are here; the trainer does not collect
    it yet (it needs the policy's per-token entropies), so ``train.objective`` refuses it.

Group ids: the caller names the generator group (e.g. ``f"step{step}/{paragraph.id}"``); a predictor group is
``f"{gen_group_id}/mask{index}"``. Everything the rewards need goes into ``Sample.metadata`` (JSON-serialisable):
``target`` is always the string the reward compares against.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_pz.data import prompts
from megatron_pz.data.corpus import Paragraph
from megatron_pz.data.parsers import extract_mask
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig, SpanResult, apply_span, sample_random_span
from megatron_pz.errors import ConfigError
from megatron_pz.types import Sample, Task

OBJECTIVES: dict[str, str] = {
    "pretrainzero": "mask generation + prediction [PZ §3.2]",
    "random_span": "Random-span RLPT baseline [PZ §4.2]",
    "next_token": "RPT entropy next-token baseline [PZ §3.1]",
}
"""Every objective, one name each, with what it trains."""
TRAINABLE_OBJECTIVES: tuple[str, ...] = ("pretrainzero", "random_span")
"""The objectives ``trainer.collect`` builds a step for (``next_token`` waits for per-token entropies)."""


def check_objective(name: str, key: str = "train.objective") -> str:
    """``name`` if the trainer can run it, else a ConfigError naming ``key`` and the choices."""
    if name in TRAINABLE_OBJECTIVES:
        return name
    choices = " or ".join(TRAINABLE_OBJECTIVES)
    if name in OBJECTIVES:
        raise ConfigError(f"{key}={name} ({OBJECTIVES[name]}) is not trainable yet; choose {choices}")
    raise ConfigError(f"{key} must be {choices}, got {name!r}")


@dataclass
class NextTokenConfig:
    """RPT next-token baseline: where to truncate a paragraph (INFERENCE, method §6 item 14)."""

    top_entropy_frac: float = 0.2
    """Candidates are the positions in the top fraction of the sequence's entropies [PZ §3.1: "top 20%"]."""
    positions_per_paragraph: int = 1
    """How many truncation points (tasks) to draw per paragraph."""
    min_context_tokens: int = 8
    """Never truncate before this many context tokens."""
    max_target_tokens: int = 32
    """The stored ground-truth continuation is cut after this many tokens (the reward only needs a prefix)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.top_entropy_frac <= 1.0:
            raise ConfigError(f"NextTokenConfig.top_entropy_frac={self.top_entropy_frac!r}: expected 0 < f <= 1")
        for name in ("positions_per_paragraph", "min_context_tokens", "max_target_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"NextTokenConfig.{name}={value!r}: expected an int >= 1")


def _paragraph_meta(paragraph: Paragraph) -> dict:
    return {"paragraph_id": paragraph.id, "title": paragraph.title}


# ---------------------------------------------------------------- PretrainZero
def generation_samples(
    paragraph: Paragraph,
    group_id: str,
    n: int,
    prompt_cfg: prompts.PromptConfig,
    chat_template: prompts.ChatTemplateFn | None = None,
) -> list[Sample]:
    """``n`` mask-generation Samples for one paragraph, forming one generator GRPO group [PZ §3.2, §4.1]."""
    text = prompts.generation_prompt(paragraph.text, prompt_cfg, chat_template)
    return [
        Sample(
            task=Task.MASK_GEN,
            group_id=group_id,
            prompt_text=text,
            metadata={**_paragraph_meta(paragraph), "paragraph": paragraph.text, "index": i,
                      "response_prefix": prompt_cfg.gen_response_prefix},
        )
        for i in range(n)
    ]


def prediction_samples(
    gen_sample: Sample,
    n: int,
    span_cfg: SpanConfig,
    prompt_cfg: prompts.PromptConfig,
    chat_template: prompts.ChatTemplateFn | None = None,
    seed: int = 0,
) -> tuple[SpanResult, list[Sample]]:
    """Parse a generator output, apply the span rules and build its predictor group [PZ §3.2, §4.4].

    Records the outcome on ``gen_sample.metadata`` (``span``, ``mask_reason``, ``mask_valid``,
    ``num_occurrences``, ``pred_group_id``). An invalid or missing mask gives no predictor Samples
    (INFERENCE, method §6 item 8); its generator reward is then 0 (``rewards.span``). ``seed`` picks the
    occurrence in one_mask mode.
    """
    paragraph = gen_sample.metadata["paragraph"]
    # A forced response prefix (PromptConfig.gen_response_prefix) is part of the prompt; the answer is prefix+text.
    response = gen_sample.metadata.get("response_prefix", "") + gen_sample.response_text
    result = apply_span(paragraph, extract_mask(response), span_cfg, seed=seed)
    pred_group_id = f"{gen_sample.group_id}/mask{gen_sample.metadata.get('index', 0)}" if result.valid else None
    gen_sample.metadata.update(
        span=result.span,
        mask_reason=result.reason.value,
        mask_valid=result.valid,
        num_occurrences=result.num_occurrences,
        pred_group_id=pred_group_id,
    )
    if not result.valid:
        return result, []
    return result, _predictor_group(
        Task.MASK_PRED,
        pred_group_id,
        n,
        result,
        span_cfg.mask_token,
        prompt_cfg,
        chat_template,
        {
            "paragraph_id": gen_sample.metadata.get("paragraph_id"),
            "gen_group_id": gen_sample.group_id,
            "gen_index": gen_sample.metadata.get("index", 0),
        },
    )


def _predictor_group(
    task: Task,
    group_id: str,
    n: int,
    result: SpanResult,
    mask_token: str,
    prompt_cfg: prompts.PromptConfig,
    chat_template: prompts.ChatTemplateFn | None,
    meta: dict,
) -> list[Sample]:
    assert result.masked_text is not None and result.span is not None
    text = prompts.prediction_prompt(result.masked_text, prompt_cfg, chat_template, mask_token)
    return [
        Sample(
            task=task,
            group_id=group_id,
            prompt_text=text,
            metadata={**meta, "target": result.span, "masked_paragraph": result.masked_text, "index": i},
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- Random-span RLPT baseline
def random_span_samples(
    paragraph: Paragraph,
    group_id: str,
    n: int,
    span_cfg: SpanConfig,
    random_cfg: RandomSpanConfig,
    prompt_cfg: prompts.PromptConfig,
    rng: random.Random,
    chat_template: prompts.ChatTemplateFn | None = None,
) -> tuple[SpanResult, list[Sample]]:
    """Random RLPT: mask a random whole-word span and build ``n`` predictor Samples [PZ §3.1, §4.2].

    Same prediction prompt and exact-match reward as PretrainZero; no generator. Returns ``[]`` when no valid
    span was found within ``random_cfg.max_tries``.
    """
    result = sample_random_span(paragraph.text, span_cfg, random_cfg, rng)
    if not result.valid:
        return result, []
    return result, _predictor_group(
        Task.RANDOM_SPAN,
        group_id,
        n,
        result,
        span_cfg.mask_token,
        prompt_cfg,
        chat_template,
        _paragraph_meta(paragraph),
    )


# ---------------------------------------------------------------- RPT next-token baseline
def select_entropy_positions(
    entropies: Sequence[float],
    cfg: NextTokenConfig,
    rng: random.Random,
    eligible: Sequence[bool] | None = None,
) -> list[int]:
    """Truncation positions among the top-``top_entropy_frac`` entropy tokens of the sequence [PZ §3.1, RPT §3.2].

    ``entropies[t]`` is the entropy of the model's distribution for token ``t`` given tokens ``< t`` (so index
    0, which has no context, is never a candidate). The top ``ceil(frac * (T - 1))`` positions of ``1..T-1`` are
    ranked by entropy (ties: earlier position first; NaN counts as lowest); of those, positions that are
    ``>= min_context_tokens`` and ``eligible`` (default: all) are candidates, and up to
    ``positions_per_paragraph`` of them are drawn without replacement. Returned sorted.
    """
    T = len(entropies)
    if T < 2:
        return []
    key = [(-e if e == e else math.inf) for e in map(float, entropies)]  # e == e is False for NaN
    ranked = sorted(range(1, T), key=lambda t: (key[t], t))
    top = ranked[: math.ceil(cfg.top_entropy_frac * (T - 1))]
    candidates = [
        t for t in top if t >= cfg.min_context_tokens and (eligible is None or eligible[t]) and key[t] != math.inf
    ]
    k = min(cfg.positions_per_paragraph, len(candidates))
    return sorted(rng.sample(candidates, k))


def next_token_samples(
    paragraph: Paragraph,
    token_byte_ends: Sequence[int],
    entropies: Sequence[float],
    group_prefix: str,
    n: int,
    cfg: NextTokenConfig,
    prompt_cfg: prompts.PromptConfig,
    rng: random.Random,
    chat_template: prompts.ChatTemplateFn | None = None,
) -> list[Sample]:
    """RPT next-token-reasoning Samples: truncate at high-entropy positions, target = the continuation [RPT §2].

    ``token_byte_ends[j]`` is the cumulative UTF-8 byte length of the paragraph's tokens ``0..j`` (strictly
    increasing, last = byte length of the text); ``entropies`` has one value per token (see
    ``select_entropy_positions``). Positions whose context would end inside a UTF-8 character are skipped.
    One group of ``n`` Samples per chosen position, ``group_id = f"{group_prefix}/pos{t}"``. Metadata carries
    ``target`` (continuation text, at most ``max_target_tokens`` tokens) and ``gt_token_byte_ends`` (token ends
    within the target, for the RPT Eq. 3 reward).
    """
    data = paragraph.text.encode("utf-8")
    ends = list(token_byte_ends)
    if len(ends) != len(entropies):
        raise ValueError(f"token_byte_ends ({len(ends)}) and entropies ({len(entropies)}) differ in length")
    if ends and (ends[-1] != len(data) or any(b <= a for a, b in zip([0] + ends[:-1], ends, strict=True))):
        raise ValueError("token_byte_ends must be strictly increasing and end at the text's byte length")

    def starts_char(t: int) -> bool:  # the context data[:ends[t-1]] ends on a UTF-8 character boundary
        return t >= 1 and (ends[t - 1] >= len(data) or (data[ends[t - 1]] & 0xC0) != 0x80)

    eligible = [starts_char(t) for t in range(len(ends))]
    samples: list[Sample] = []
    for t in select_entropy_positions(entropies, cfg, rng, eligible):
        cut = ends[t - 1]
        last = min(len(ends), t + cfg.max_target_tokens) - 1
        target = data[cut : ends[last]].decode("utf-8", errors="ignore")
        gt_ends = [e - cut for e in ends[t : last + 1] if e - cut <= len(target.encode("utf-8"))]
        context = data[:cut].decode("utf-8")
        text = prompts.next_token_prompt(context, prompt_cfg, chat_template)
        samples += [
            Sample(
                task=Task.NEXT_TOKEN,
                group_id=f"{group_prefix}/pos{t}",
                prompt_text=text,
                metadata={
                    **_paragraph_meta(paragraph),
                    "position": t,
                    "context": context,
                    "target": target,
                    "gt_token_byte_ends": gt_ends,
                    "index": i,
                },
            )
            for i in range(n)
        ]
    return samples
