"""The supervised warm-up (train.objective=sft_span): its loss and its sample builder, with hand-computed numbers.

Loss, two sequences of target log-probs (padding holds NaN, which must not leak):

    seq 0: log p = [-1, -2, -3]         seq 1: log p = [-0.5, -0.1, pad]
    token sum of -log p = 1 + 2 + 3 + 0.5 + 0.1 = 6.6 over 5 tokens
    loss with num_global_tokens = 10: -(-6.6) / 10 = 0.66;  d loss / d logp = -1/10 on every valid token
    metrics: mean NLL 6.6 / 5 = 1.32; target_prob = (e^-1 + e^-2 + e^-3 + e^-0.5 + e^-0.1) / 5;
             seq_sure: seq 1 has every p > 1/2 (-0.5 > -ln 2 = -0.693, -0.1 too), seq 0 not -> 1/2
"""
import math
import random

import pytest
import torch

from megatron_pz.algo.loss import sft_loss
from megatron_pz.config import load_config
from megatron_pz.data.corpus import Paragraph
from megatron_pz.data.prompts import PromptConfig, generation_prompt, prediction_prompt, restated_context
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig
from megatron_pz.data.tasks import OBJECTIVES, sft_answer, sft_mask_answer, sft_span_samples
from megatron_pz.errors import ConfigError
from megatron_pz.logs.stats import sample_scalars
from megatron_pz.trainer.collect import StepContext, collect_sft_span
from megatron_pz.types import Sample, Status, Task

LOGP = [[-1.0, -2.0, -3.0], [-0.5, -0.1, float("nan")]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_sft_loss_hand_computed_value_gradient_and_metrics():
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    loss, m = sft_loss(logp, MASK, 10.0)
    assert math.isclose(loss.item(), 0.66, rel_tol=1e-12)
    loss.backward()
    assert torch.equal(logp.grad, torch.tensor([[-0.1, -0.1, -0.1], [-0.1, -0.1, 0.0]], dtype=torch.float64))
    assert math.isclose(m["loss"].item(), 1.32, rel_tol=1e-12)
    assert math.isclose(m["target_logprob"].item(), -1.32, rel_tol=1e-12)
    probs = [math.exp(-1), math.exp(-2), math.exp(-3), math.exp(-0.5), math.exp(-0.1)]
    assert math.isclose(m["target_prob"].item(), sum(probs) / 5, rel_tol=1e-12)
    assert m["seq_sure"].item() == 0.5 and m["num_tokens"].item() == 5


def test_sft_loss_is_independent_of_micro_batching():
    """Split into two micro-batches with the global count, the summed losses and gradients equal the whole."""
    full = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    sft_loss(full, MASK, 5.0)[0].backward()
    parts = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    total = sft_loss(parts[:1], MASK[:1], 5.0)[0] + sft_loss(parts[1:], MASK[1:], 5.0)[0]
    total.backward()
    assert math.isclose(total.item(), 6.6 / 5, rel_tol=1e-12)
    assert torch.equal(full.grad, parts.grad)
    empty = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)  # a micro-batch without tokens
    loss, m = sft_loss(empty, torch.zeros(1, 3), torch.tensor(0.0))
    assert loss.item() == 0.0 and m["num_tokens"].item() == 0


P = Paragraph("enwiki-1-000", "Ralph Hanover", "Ralph Hanover won seventeen additional stakes events.")
ONE_WORD = RandomSpanConfig(geometric_p=1.0)


def test_sft_span_samples_answer_the_prediction_prompt_with_the_boxed_span():
    cfg = PromptConfig()
    result, samples = sft_span_samples(P, "s0/p0/m0", SpanConfig(), ONE_WORD, cfg, random.Random(3))
    assert result.valid and len(result.span.split()) == 1 and len(samples) == 1
    s = samples[0]
    assert s.task is Task.SFT_SPAN and s.status is Status.COMPLETED and s.advantage == 1.0 and s.trainable is False
    assert s.prompt_text == prediction_prompt(result.masked_text, cfg)
    assert s.response_text == "\\boxed{" + result.span + "}" and s.metadata["target"] == result.span
    # the same seed draws the same span as the Random-span baseline (data.spans.sample_random_span)
    again, _ = sft_span_samples(P, "x", SpanConfig(), ONE_WORD, cfg, random.Random(3))
    assert again.span == result.span


def test_sft_generator_samples_continue_the_forced_prefix():
    cfg = PromptConfig(gen_response_prefix="The masked words are: \\mask{")
    result, (pred, gen) = sft_span_samples(P, "g", SpanConfig(), ONE_WORD, cfg, random.Random(3),
                                           generator_samples=True)
    assert gen.prompt_text == generation_prompt(P.text, cfg) and gen.prompt_text.endswith("\\mask{")
    assert gen.response_text == result.span + "}" and gen.group_id == "g/gen"
    assert (pred.metadata["role"], gen.metadata["role"]) == ("predict", "generate")
    assert sft_answer("stakes") == "\\boxed{stakes}"
    assert sft_mask_answer("stakes") == "\\mask{stakes}"
    assert sft_mask_answer("stakes", "The masked words are: \\mask{") == "stakes}"


def test_generator_only_warm_up_leaves_the_predictor_out():
    cfg = PromptConfig(gen_response_prefix="The masked words are: \\mask{")
    result, (gen,) = sft_span_samples(P, "g", SpanConfig(), ONE_WORD, cfg, random.Random(3),
                                      generator_samples=True, predictor_samples=False)
    assert gen.metadata["role"] == "generate" and gen.response_text == result.span + "}"
    ctx = StepContext(encode=lambda t: [ord(c) for c in t], decode=lambda ids: "".join(map(chr, ids)),
                      chat_template=None, step=0, dp_rank=0, eos_token_id=0)
    run = load_config(None, ["train.objective=sft_span", "train.masks_per_paragraph=3", "random_span.geometric_p=1.0",
                             "sft.generator_samples=true", "sft.predictor_samples=false"])
    samples, metrics = collect_sft_span([P], run, None, ctx)
    assert [s.metadata["role"] for s in samples] == ["generate"] * 3 and metrics["sft_spans"] == 3.0
    with pytest.raises(ConfigError, match="both false"):
        load_config(None, ["train.objective=sft_span", "sft.predictor_samples=false"])


def test_restated_prompt_teaches_the_continuation():
    """prompt.pred_restate: the prompt ends mid-sentence before the span, and the answer is " span" (no box)."""
    cfg = PromptConfig(pred_restate=True)
    result, (pred,) = sft_span_samples(P, "g", SpanConfig(), ONE_WORD, cfg, random.Random(3))
    assert pred.response_text == " " + result.span and sft_answer("stakes", restate=True) == " stakes"
    assert pred.prompt_text.endswith(restated_context(result.masked_text))


def test_collector_tokenises_answers_with_eos_and_cuts_at_the_cap():
    """Byte tokenizer (one id per character), EOS 0: "\\boxed{w}" is len(w) + 8 ids plus EOS."""
    cfg = load_config(None, ["train.objective=sft_span", "train.masks_per_paragraph=3", "random_span.geometric_p=1.0",
                             "rollout.pred_max_new_tokens=12"])
    assert "sft_span" in OBJECTIVES and cfg.train.predictions_per_mask == 8  # unused, and not checked
    ctx = StepContext(encode=lambda t: [ord(c) for c in t], decode=lambda ids: "".join(map(chr, ids)),
                      chat_template=None, step=0, dp_rank=0, eos_token_id=0)
    samples, metrics = collect_sft_span([P], cfg, None, ctx)
    assert len(samples) == 3 and metrics == {"sft_spans": 3.0, "sft_span_words_mean": 1.0}
    for s in samples:
        ids = [ord(c) for c in s.response_text] + [0]
        assert s.response_ids == ids[:12] and s.prompt_ids == [ord(c) for c in s.prompt_text]
        assert s.status is (Status.COMPLETED if len(ids) <= 12 else Status.TRUNCATED)
        assert s.trainable
    assert any(s.status is Status.TRUNCATED for s in samples)  # "seventeen": 9 + 8 + 1 = 18 ids > 12


def test_mixed_group_counts():
    def sample(group, reward):
        return Sample(task=Task.RANDOM_SPAN, group_id=group, status=Status.COMPLETED, reward=reward,
                      response_ids=[1])
    samples = [sample("a", 0.0), sample("a", 1.0), sample("b", 0.0), sample("b", 0.0), sample("c", 1.0),
               sample("c", 1.0)]
    out = sample_scalars(samples)
    assert (out["groups/random_span"], out["groups_mixed/random_span"]) == (3.0, 1.0)
    assert math.isclose(out["groups_mixed_frac/random_span"], 1 / 3)
