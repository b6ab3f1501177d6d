"""One step's rollouts for one data-parallel rank: paragraphs -> scored, advantage-weighted ``Sample``s.

PretrainZero [PZ §3.2-3.3, §4.1]:
    paragraphs --generate n=masks--> generator Samples --parse \\mask{}, span rules--> predictor groups
    --generate n=predictions--> predictor Samples --exact match--> r_pred --per-mask accuracy (Eq. 9)--> r_gen
    --GRPO per group + DAPO filter--> advantages
Random-span RLPT [PZ §4.2]: ``masks_per_paragraph`` random whole-word spans per paragraph, each a predictor group.
Supervised warm-up (sft_span; not in the paper): ``masks_per_paragraph`` random spans per paragraph, each one
    Sample whose response is the teacher-forced answer (no generation, no reward, no advantage).
RPT next-token reasoning [PZ §3.1, RPT §2]:
    paragraphs --one prefill each, top-K log-probs of every position--> per-token entropies --top 20 %, seeded
    draw--> ``masks_per_paragraph`` truncation positions --RPT prompt, generate n=predictions--> next_token Samples
    --byte-prefix match (RPT Eq. 3)--> reward --GRPO + DAPO--> advantages

Where RPT's entropies come from: the current policy itself, through the rollout engine, at the start of the step.
Each paragraph is sent once as a /generate request with ``logprob_start_len=0`` and ``top_logprobs_num=K``
(``RolloutEngine.input_top_logprobs``); the entropy of position t is that of the top-K distribution renormalised
(``data.next_token.topk_entropy``, K = ``rpt.entropy_top_k``, RPT's 16). RPT instead filters with a fixed proxy
model; the policy's own entropies need no second model in the trainer, follow the policy as it learns (the
positions stay hard for the model being trained), and come from whatever serves the rollouts (SGLang servers at
scale, the embedded engine on CPU) at the cost of one prefill per paragraph.

All samples of a group come from one prompt sent once with ``n`` samples, so they share the prompt's KV cache.
Every random choice derives from (seed, step, rank, index), so a resumed run makes the same choices.
"""
from __future__ import annotations

import dataclasses
import random
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from megatron_pz.algo.advantages import compute_advantages
from megatron_pz.data.corpus import Paragraph
from megatron_pz.data.next_token import next_token_samples, token_byte_ends, topk_entropy
from megatron_pz.data.tasks import generation_samples, prediction_samples, random_span_samples, sft_span_samples
from megatron_pz.rewards.span import assign_generator_rewards, score_samples
from megatron_pz.rollout.protocol import SamplingParams, fill_sample
from megatron_pz.types import Sample, Status

if TYPE_CHECKING:  # the config imports every section; collection needs only its type
    from megatron_pz.config import RunConfig


@dataclass
class StepContext:
    """What collection needs besides the config: tokenizer functions and this rank's identity."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    chat_template: Callable[[list[dict[str, str]]], str] | None
    step: int
    dp_rank: int
    eos_token_id: int | None = None  # appended to teacher-forced responses (sft_span) so the model learns to stop


def sample_seed(*parts: Any) -> int:
    """A stable seed from (run seed, step, DP rank, paragraph): the same spans on a resumed run and in benchmarks/."""
    return zlib.crc32(repr(parts).encode())


def sampling_seed(cfg: RunConfig, ctx: StepContext, task: str) -> int | None:
    """The base sampling seed of one task's requests this step (``rollout.reproducible``), else None.

    Prompt g of the batch samples with base + g and its sample j with ``rollout.seeds.sample_seed(base + g, j)``:
    every sample has its own seed, a function of (train.seed, step, DP rank, task, prompt, sample), so a resumed
    step sends the same seeds as the step it repeats."""
    if not cfg.rollout.reproducible:
        return None
    return sample_seed(cfg.train.seed, ctx.step, ctx.dp_rank, task) % 2**31


def _generate(engine: Any, samples: Sequence[Sample], n: int, params: SamplingParams, ctx: StepContext) -> None:
    """Generate for consecutive groups of ``n`` samples that share a prompt; fill each Sample in place."""
    prompts = [ctx.encode(samples[i].prompt_text) for i in range(0, len(samples), n)]
    if not prompts:
        return
    results = engine.generate(prompts, params)
    for g, (ids, per_prompt) in enumerate(zip(prompts, results, strict=True)):
        for j, result in enumerate(per_prompt):
            s = samples[g * n + j]
            s.prompt_ids = ids
            fill_sample(s, result)
            if not s.response_text:
                s.response_text = ctx.decode(s.response_ids)


def collect_pretrainzero(paragraphs: Sequence[Paragraph], cfg: RunConfig, engine: Any,
                         ctx: StepContext) -> tuple[list[Sample], dict[str, float]]:
    """Both PretrainZero tasks for this rank's paragraphs."""
    t, r = cfg.train, cfg.rollout
    gen: list[Sample] = []
    for i, p in enumerate(paragraphs):
        gen += generation_samples(p, f"s{ctx.step}/r{ctx.dp_rank}/p{i}", t.masks_per_paragraph, cfg.prompt,
                                  ctx.chat_template)
    _generate(engine, gen, t.masks_per_paragraph,
              SamplingParams(n=t.masks_per_paragraph, max_new_tokens=cfg.gen_max_new_tokens,
                             seed=sampling_seed(cfg, ctx, "mask_gen"),
                             temperature=r.temperature, top_p=r.top_p), ctx)
    pred: list[Sample] = []
    for k, g in enumerate(gen):
        _, group = prediction_samples(g, t.predictions_per_mask, cfg.span, cfg.prompt, ctx.chat_template,
                                      seed=sample_seed(t.seed, ctx.step, ctx.dp_rank, k))
        pred += group
    _generate(engine, pred, t.predictions_per_mask,
              SamplingParams(n=t.predictions_per_mask, max_new_tokens=cfg.pred_max_new_tokens,
                             seed=sampling_seed(cfg, ctx, "predict"),
                             temperature=r.temperature, top_p=r.top_p), ctx)
    score_samples(pred, cfg.reward)
    metrics = assign_generator_rewards(gen, pred, cfg.reward)
    metrics.update({f"adv/{k}": v for k, v in compute_advantages(gen + pred, cfg.advantage).items()})
    return gen + pred, metrics


def collect_random_span(paragraphs: Sequence[Paragraph], cfg: RunConfig, engine: Any,
                        ctx: StepContext) -> tuple[list[Sample], dict[str, float]]:
    """Random-span RLPT: the same prediction prompt, reward and group layout, spans drawn at random."""
    t, r = cfg.train, cfg.rollout
    pred: list[Sample] = []
    for i, p in enumerate(paragraphs):
        rng = random.Random(sample_seed(t.seed, ctx.step, ctx.dp_rank, i))
        for m in range(t.masks_per_paragraph):
            _, group = random_span_samples(p, f"s{ctx.step}/r{ctx.dp_rank}/p{i}/m{m}", t.predictions_per_mask,
                                           cfg.span, cfg.random_span, cfg.prompt, rng, ctx.chat_template)
            pred += group
    _generate(engine, pred, t.predictions_per_mask,
              SamplingParams(n=t.predictions_per_mask, max_new_tokens=cfg.pred_max_new_tokens,
                             seed=sampling_seed(cfg, ctx, "predict"),
                             temperature=r.temperature, top_p=r.top_p), ctx)
    score_samples(pred, cfg.reward)
    rewards = [s.reward for s in pred if s.reward is not None]
    metrics = {"pred_acc_mean": sum(rewards) / len(rewards) if rewards else 0.0}
    metrics.update({f"adv/{k}": v for k, v in compute_advantages(pred, cfg.advantage).items()})
    return pred, metrics


def collect_rpt(paragraphs: Sequence[Paragraph], cfg: RunConfig, engine: Any,
                ctx: StepContext) -> tuple[list[Sample], dict[str, float]]:
    """RPT next-token reasoning at the policy's own high-entropy positions (see the module docstring)."""
    t, r, nt = cfg.train, cfg.rollout, cfg.rpt
    tokens = [ctx.encode(p.text) for p in paragraphs]
    scored = [i for i, ids in enumerate(tokens) if len(ids) >= 2]  # a one-token paragraph has no position to cut
    tops = dict(zip(scored, engine.input_top_logprobs([tokens[i] for i in scored], nt.entropy_top_k)))
    samples: list[Sample] = []
    entropies_all: list[float] = []
    for i in scored:
        text = ctx.decode(tokens[i])  # the text the byte ends index (p.text itself for a lossless tokenizer)
        entropies = [topk_entropy(row) for row in tops[i]]
        entropies_all += [e for e in entropies if e == e]
        rng = random.Random(sample_seed(t.seed, ctx.step, ctx.dp_rank, i))
        samples += next_token_samples(dataclasses.replace(paragraphs[i], text=text),
                                      token_byte_ends(text, tokens[i], ctx.decode), entropies,
                                      f"s{ctx.step}/r{ctx.dp_rank}/p{i}", t.masks_per_paragraph,
                                      t.predictions_per_mask, nt, cfg.prompt, rng, ctx.chat_template)
    _generate(engine, samples, t.predictions_per_mask,
              SamplingParams(n=t.predictions_per_mask, max_new_tokens=cfg.pred_max_new_tokens,
                             seed=sampling_seed(cfg, ctx, "next_token"),
                             temperature=r.temperature, top_p=r.top_p), ctx)
    score_samples(samples, cfg.reward)
    rewards = [s.reward for s in samples if s.reward is not None]
    chosen = [s.metadata["entropy"] for s in samples[::t.predictions_per_mask]]
    metrics = {"pred_acc_mean": sum(rewards) / len(rewards) if rewards else 0.0,
               "next_token_positions": float(len(chosen)),
               "next_token_entropy_mean": sum(chosen) / len(chosen) if chosen else 0.0,
               "paragraph_entropy_mean": sum(entropies_all) / len(entropies_all) if entropies_all else 0.0}
    metrics.update({f"adv/{k}": v for k, v in compute_advantages(samples, cfg.advantage).items()})
    return samples, metrics


def collect_sft_span(paragraphs: Sequence[Paragraph], cfg: RunConfig, engine: Any,
                     ctx: StepContext) -> tuple[list[Sample], dict[str, float]]:
    """Supervised warm-up: random spans with their answers as responses, tokenised here; the engine is not used.

    The response is the answer's tokens plus EOS, cut at ``rollout.pred_max_new_tokens`` (then TRUNCATED, without
    EOS), so the warm-up never teaches a response the RL stage could not produce."""
    t = cfg.train
    samples: list[Sample] = []
    for i, p in enumerate(paragraphs):
        rng = random.Random(sample_seed(t.seed, ctx.step, ctx.dp_rank, i))
        for m in range(t.masks_per_paragraph):
            _, group = sft_span_samples(p, f"s{ctx.step}/r{ctx.dp_rank}/p{i}/m{m}", cfg.span, cfg.random_span,
                                        cfg.prompt, rng, ctx.chat_template, cfg.sft.generator_samples,
                                        cfg.sft.predictor_samples)
            samples += group
    cap = cfg.pred_max_new_tokens
    for s in samples:
        s.prompt_ids = ctx.encode(s.prompt_text)
        ids = ctx.encode(s.response_text) + ([ctx.eos_token_id] if ctx.eos_token_id is not None else [])
        s.response_ids = ids[:cap]
        s.finish_reason = "stop" if len(ids) <= cap else "length"
        if len(ids) > cap:
            s.status = Status.TRUNCATED
    role = "predict" if cfg.sft.predictor_samples else "generate"  # each span once
    spans = [s.metadata["target"] for s in samples if s.metadata.get("role") == role]
    metrics = {"sft_spans": float(len(spans)),
               "sft_span_words_mean": sum(len(x.split()) for x in spans) / len(spans) if spans else 0.0}
    return samples, metrics


COLLECTORS: dict[str, Callable[..., tuple[list[Sample], dict[str, float]]]] = {
    "pretrainzero": collect_pretrainzero,
    "random_span": collect_random_span,
    "rpt": collect_rpt,
    "sft_span": collect_sft_span,
}
"""One collector per objective, keyed by name: exactly the entries of ``data.objectives.OBJECTIVES``."""


def collect(paragraphs: Sequence[Paragraph], cfg: RunConfig, engine: Any,
            ctx: StepContext) -> tuple[list[Sample], dict[str, float]]:
    """This rank's samples and rollout metrics for one step of ``cfg.train.objective``."""
    return COLLECTORS[cfg.train.objective](paragraphs, cfg, engine, ctx)

