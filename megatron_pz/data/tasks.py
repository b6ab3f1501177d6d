"""Build ``Sample`` records for each objective: PretrainZero generation/prediction and the two baselines.

Objectives (``OBJECTIVES``: one ``Objective`` record each, in ``data/objectives.py``; the run picks one with
``train.objective``, and the GRPO group sizes are ``train.masks_per_paragraph`` and ``train.predictions_per_mask``):
  * ``"pretrainzero"``: paragraph -> ``n`` generator Samples (one GRPO group); each valid generator output ->
    ``n`` predictor Samples (one group per mask) [PZ §3.2, §4.1].
  * ``"random_span"``: Random-span RLPT: paragraph -> random whole-word span -> ``n`` predictor Samples with the
    same prediction prompt and reward [PZ §3.1, §4.2 baseline 4].
  * ``"sft_span"``: supervised warm-up (a cold start before either RL objective; not in PretrainZero, which
    starts SmolLM3 with Random-span RLPT instead, but RLPT's own recipe starts with SFT [method §5.2]):
    paragraph -> ``masks_per_paragraph`` random whole-word spans -> one Sample each, the prediction prompt with
    the answer ``\\boxed{span}`` as a teacher-forced response (``sft_span_samples``); no rollout, no reward.
  * ``"rpt"``: RPT next-token reasoning: paragraph -> ``masks_per_paragraph`` high-entropy truncation positions
    -> ``n`` Samples of task ``next_token`` per position, byte-prefix reward [PZ §3.1 "Entropy-based Next Token
    Reasoning"; RPT §2]. Its builders are in ``data/next_token.py``.

Group ids: the caller names the generator group (e.g. ``f"step{step}/{paragraph.id}"``); a predictor group is
``f"{gen_group_id}/mask{index}"``. Everything the rewards need goes into ``Sample.metadata`` (JSON-serialisable):
``target`` is always the string the reward compares against.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_pz.data import prompts
from megatron_pz.data.corpus import Paragraph
from megatron_pz.data.objectives import OBJECTIVES, Objective, check_objective, objective_of  # noqa: F401
from megatron_pz.data.parsers import extract_mask
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig, SpanResult, apply_span, sample_random_span
from megatron_pz.errors import ConfigError
from megatron_pz.types import Sample, Status, Task


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


# ---------------------------------------------------------------- supervised warm-up (sft_span)
@dataclass
class SftConfig:
    """The supervised warm-up ``train.objective=sft_span`` (spans: ``random_span``; spans per paragraph:
    ``train.masks_per_paragraph``). Not in the paper; see ``sft_span_samples``."""

    generator_samples: bool = False
    """Also teach the mask-generation format: per span, a second Sample with the generation prompt and the answer
    ``\\mask{span}`` (after ``prompt.gen_response_prefix``). Off: the warm-up trains the predictor only."""
    predictor_samples: bool = True
    """Teach the prediction answer (``sft_answer``). Off, with ``generator_samples``: a generator-only warm-up that
    teaches the ``\\mask{}`` format and leaves the predictor's answers to RL (docs/coldstart.md: a 12-step warm-up
    on the answers lowered the restated Random-span mixed-group share from 17 % to 11 %)."""

    def __post_init__(self) -> None:
        for key in ("generator_samples", "predictor_samples"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"sft.{key}={getattr(self, key)!r}: expected true/false")
        if not (self.generator_samples or self.predictor_samples):
            raise ConfigError("sft.generator_samples and sft.predictor_samples are both false: nothing to train")


def sft_answer(span: str, restate: bool = False) -> str:
    """The teacher-forced prediction answer: the span in ``\\boxed{}``, nothing else (no reasoning). After a
    restated prompt (``prompt.pred_restate``) the answer is the continuation itself: " " + span."""
    return " " + span if restate else "\\boxed{" + span + "}"


def sft_mask_answer(span: str, response_prefix: str = "") -> str:
    """The teacher-forced generation answer ``\\mask{span}``, minus what the forced response prefix already wrote."""
    return (span + "}") if response_prefix.endswith("\\mask{") else "\\mask{" + span + "}"


def sft_span_samples(
    paragraph: Paragraph,
    group_id: str,
    span_cfg: SpanConfig,
    random_cfg: RandomSpanConfig,
    prompt_cfg: prompts.PromptConfig,
    rng: random.Random,
    chat_template: prompts.ChatTemplateFn | None = None,
    generator_samples: bool = False,
    predictor_samples: bool = True,
) -> tuple[SpanResult, list[Sample]]:
    """Supervised warm-up Samples for one random whole-word span (``train.objective=sft_span``).

    The span is drawn as in ``random_span_samples`` and the prompt is the same prediction prompt, so the warm-up
    teaches exactly the task the RL stage rewards. The response is ``sft_answer(span)``: the answer in the format
    the exact-match reward parses, without reasoning, which a 135M model cannot yet do usefully and which would
    make the target a text we do not have. The trainer appends EOS so the model also learns to stop. Samples are
    COMPLETED with advantage 1 (they are trained on); they carry no rollout log-probs and no reward. With
    ``generator_samples``, a second Sample teaches the generator format (``sft_mask_answer``); without
    ``predictor_samples`` the prediction Sample is left out.
    """
    result = sample_random_span(paragraph.text, span_cfg, random_cfg, rng)
    if not result.valid:
        return result, []
    assert result.masked_text is not None and result.span is not None
    meta = {**_paragraph_meta(paragraph), "target": result.span}
    pred = Sample(task=Task.SFT_SPAN, group_id=group_id, status=Status.COMPLETED, advantage=1.0,
                  prompt_text=prompts.prediction_prompt(result.masked_text, prompt_cfg, chat_template,
                                                        span_cfg.mask_token),
                  response_text=sft_answer(result.span, prompt_cfg.pred_restate),
                  metadata={**meta, "role": "predict", "masked_paragraph": result.masked_text})
    preds = [pred] if predictor_samples else []
    if not generator_samples:
        return result, preds
    gen = Sample(task=Task.SFT_SPAN, group_id=f"{group_id}/gen", status=Status.COMPLETED, advantage=1.0,
                 prompt_text=prompts.generation_prompt(paragraph.text, prompt_cfg, chat_template),
                 response_text=sft_mask_answer(result.span, prompt_cfg.gen_response_prefix),
                 metadata={**meta, "role": "generate"})
    return result, [*preds, gen]
