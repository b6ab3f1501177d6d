"""Task builders: PretrainZero generator/predictor Samples, the Random-RLPT baseline, the objective list, preview tool.

The RPT next-token builders are tested in test_core_next_token.py.
"""
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pz.data.corpus import Paragraph
from megatron_pz.data.prompts import PromptConfig, generation_prompt, prediction_prompt
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig
from megatron_pz.config import load_config
from megatron_pz.data.next_token import NextTokenConfig
from megatron_pz.data.tasks import (
    OBJECTIVES,
    check_objective,
    generation_samples,
    prediction_samples,
    random_span_samples,
)
from megatron_pz.errors import ConfigError
from megatron_pz.types import Status, Task

ROOT = Path(__file__).resolve().parents[2]
PLAIN = PromptConfig()
P = Paragraph("enwiki-1-000", "Ralph Hanover", "Ralph Hanover won seventeen additional stakes events. The stakes grew.")


def test_generation_samples_form_one_group():
    gens = generation_samples(P, "step3/enwiki-1-000", 8, PLAIN)
    assert len(gens) == 8 and {g.group_id for g in gens} == {"step3/enwiki-1-000"}
    assert all(g.task is Task.MASK_GEN and g.status is Status.PENDING for g in gens)
    assert gens[5].prompt_text == generation_prompt(P.text, PLAIN)
    assert gens[5].metadata == {"paragraph_id": P.id, "title": P.title, "paragraph": P.text, "index": 5,
                                "response_prefix": ""}


def test_response_prefix_ends_the_prompt_and_is_parsed_with_the_response():
    cfg = PromptConfig(gen_response_prefix="The masked words are: \\mask{")
    gen = generation_samples(P, "g", 2, cfg)[1]
    assert gen.prompt_text == generation_prompt(P.text, PLAIN) + "The masked words are: \\mask{"
    gen.response_text = "additional stakes} because they are hard"  # the model continues inside the braces
    result, preds = prediction_samples(gen, 4, SpanConfig(), cfg)
    assert result.valid and gen.metadata["span"] == "additional stakes" and len(preds) == 4
    # the prediction prompt is not affected by the generator's prefix
    assert preds[0].prompt_text == prediction_prompt(result.masked_text, PLAIN)
    # without the prefix the same continuation has no \mask{ at all
    gen.metadata["response_prefix"] = ""
    assert not prediction_samples(gen, 4, SpanConfig(), cfg)[0].valid


def test_response_prefix_must_be_a_string():
    with pytest.raises(ConfigError, match="gen_response_prefix"):
        PromptConfig(gen_response_prefix=3)


def test_valid_mask_builds_a_predictor_group():
    gen = generation_samples(P, "g", 8, PLAIN)[2]
    gen.response_text = "I will hide the prize type. \\mask{ stakes }"
    result, preds = prediction_samples(gen, 8, SpanConfig(), PLAIN)
    masked = "Ralph Hanover won seventeen additional [mask] events. The [mask] grew."
    assert result.valid and result.masked_text == masked
    assert len(preds) == 8 and {p.group_id for p in preds} == {"g/mask2"}
    assert all(p.task is Task.MASK_PRED for p in preds)
    assert preds[0].prompt_text == prediction_prompt(masked, PLAIN)
    assert preds[7].metadata == {"paragraph_id": P.id, "gen_group_id": "g", "gen_index": 2, "target": "stakes",
                                 "masked_paragraph": masked, "index": 7}
    assert gen.metadata["span"] == "stakes" and gen.metadata["mask_valid"] is True
    assert gen.metadata["pred_group_id"] == "g/mask2" and gen.metadata["num_occurrences"] == 2


def test_one_mask_mode_in_task_builder():
    gen = generation_samples(P, "g", 1, PLAIN)[0]
    gen.response_text = "\\mask{stakes}"
    result, preds = prediction_samples(gen, 2, SpanConfig(mode="one_mask"), PLAIN, seed=1)
    assert preds[0].metadata["masked_paragraph"].count("[mask]") == 1 and len(result.positions) == 1


@pytest.mark.parametrize("response, reason", [("no mask", "missing"), ("\\mask{horses}", "not_found"),
                                              ("\\mask{  }", "empty"), ("\\mask{stakes", "missing")])
def test_invalid_mask_builds_no_predictor_group(response, reason):
    gen = generation_samples(P, "g", 1, PLAIN)[0]
    gen.response_text = response
    result, preds = prediction_samples(gen, 8, SpanConfig(), PLAIN)
    assert preds == [] and not result.valid
    assert gen.metadata["mask_reason"] == reason and gen.metadata["mask_valid"] is False
    assert gen.metadata["pred_group_id"] is None


def test_ambiguous_mask_is_recorded_and_counted_like_the_other_reasons():
    from megatron_pz.rewards.span import RewardConfig, assign_generator_rewards

    # mask token "aa" next to an "a": "ab cb" -> "aaa caa", which would unmask to "ba cb"
    gens = generation_samples(Paragraph("p", "t", "ab cb"), "g", 2, PLAIN)
    gens[0].response_text, gens[1].response_text = "\\mask{b}", "\\mask{c}"
    cfg = SpanConfig(mask_token="aa")
    result, preds = prediction_samples(gens[0], 4, cfg, PLAIN)
    assert result.reason.value == "ambiguous_mask" and preds == []
    assert gens[0].metadata["mask_reason"] == "ambiguous_mask" and gens[0].metadata["mask_valid"] is False
    result, preds = prediction_samples(gens[1], 4, cfg, PLAIN)  # "ab aab" unmasks back to "ab cb"
    assert result.valid and result.masked_text == "ab aab" and len(preds) == 4
    for g in gens:
        g.status = Status.COMPLETED
    metrics = assign_generator_rewards(gens, [], RewardConfig())
    assert metrics["mask_reason/ambiguous_mask"] == 0.5 and metrics["mask_valid_frac"] == 0.5


def test_random_span_skips_a_paragraph_holding_the_mask_token():
    result, samples = random_span_samples(Paragraph("x", "", "the [mask] of it"), "x", 8, SpanConfig(),
                                          RandomSpanConfig(), PLAIN, random.Random(0))
    assert samples == [] and result.reason.value == "mask_token_in_text"


@pytest.mark.parametrize("override, key", [
    ("span.max_occurrences=1", "span.max_occurrences"), ("span.max_occurrences=-3", "span.max_occurrences"),
    ("span.mask_token=", "span.mask_token"), ("span.mode=all", "span.mode"),
    ("random_span.geometric_p=0.0", "random_span.geometric_p"),
    ("random_span.geometric_p=1.5", "random_span.geometric_p"),
    ("random_span.geometric_p=.nan", "random_span.geometric_p"), ("random_span.max_words=0", "random_span.max_words"),
    ("random_span.max_tries=0", "random_span.max_tries"), ("random_span.max_tries=1000000", "random_span.max_tries"),
    ("corpus.max_prompt_tokens=16", "corpus.max_prompt_tokens"), ("corpus.prompt_margin_tokens=-1",
                                                                   "corpus.prompt_margin_tokens"),
    ("corpus.num_epochs=0", "corpus.num_epochs"), ("corpus.drop_if_contains=['']", "corpus.drop_if_contains"),
    ("rpt.top_entropy_frac=1.5", "rpt.top_entropy_frac"), ("rpt.min_context_tokens=0", "rpt.min_context_tokens"),
    ("train.masks_per_paragraph=0", "train.masks_per_paragraph"),
])
def test_span_and_corpus_numbers_fail_at_config_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_a_custom_mask_token_is_dropped_at_the_corpus():
    """The resolved config (what the trainer runs on) adds it; the loaded one keeps the file's list."""
    assert load_config(None).resolved().corpus.drop_if_contains == ["[mask]"]
    custom = load_config(None, ["span.mask_token=<M>"])
    assert custom.resolved().corpus.drop_if_contains == ["[mask]", "<M>"]
    assert custom.corpus.drop_if_contains == ["[mask]"]
    named = load_config(None, ["span.mask_token=<M>", "corpus.drop_if_contains=[<M>]"])
    assert named.resolved().corpus.drop_if_contains == ["<M>"]
    # rpt masks nothing: its corpus filter is left as written
    rpt = load_config(None, ["train.objective=rpt", "span.mask_token=<M>"])
    assert rpt.resolved().corpus.drop_if_contains == ["[mask]"]


def test_random_span_samples():
    result, samples = random_span_samples(P, "rnd/enwiki-1-000", 8, SpanConfig(), RandomSpanConfig(), PLAIN,
                                          random.Random(7))
    assert result.valid and len(samples) == 8
    assert all(s.task is Task.RANDOM_SPAN and s.group_id == "rnd/enwiki-1-000" for s in samples)
    assert samples[0].metadata["target"] == result.span
    assert samples[0].prompt_text == prediction_prompt(result.masked_text, PLAIN)
    again, _ = random_span_samples(P, "x", 1, SpanConfig(), RandomSpanConfig(), PLAIN, random.Random(7))
    assert again == result
    none, empty = random_span_samples(Paragraph("x", "", "?!"), "x", 8, SpanConfig(), RandomSpanConfig(), PLAIN,
                                      random.Random(0))
    assert empty == [] and not none.valid


@pytest.mark.parametrize("cls, kwargs, field", [
    (NextTokenConfig, {"top_entropy_frac": 0.0}, "top_entropy_frac"),
    (NextTokenConfig, {"max_target_tokens": 0}, "max_target_tokens")])
def test_task_config_validation(cls, kwargs, field):
    with pytest.raises(ConfigError, match=f"rpt.{field}="):  # the run-config key
        cls(**kwargs)


def test_one_objective_list_with_one_name_each():
    """The objective and the GRPO group sizes are named once, in `train` (the TaskConfig duplicate is gone)."""
    from megatron_pz.trainer.collect import COLLECTORS

    assert tuple(OBJECTIVES) == tuple(COLLECTORS) == ("pretrainzero", "random_span", "rpt", "sft_span")
    for name in OBJECTIVES:
        assert check_objective(name) == name
    with pytest.raises(ConfigError, match=r"train\.objective must be pretrainzero, random_span, rpt or sft_span, got 'next_token'"):
        load_config(None, ["train.objective=next_token"])  # the task's name, not an objective
    t = load_config(None).train  # defaults: the paper's group sizes [PZ §4.1]
    assert (t.objective, t.masks_per_paragraph, t.predictions_per_mask) == ("pretrainzero", 8, 8)
    # masks_per_paragraph is a GRPO group only for pretrainzero; for rpt it counts positions, and 1 is fine
    assert load_config(None, ["train.objective=rpt", "train.masks_per_paragraph=1"]).train.masks_per_paragraph == 1
    with pytest.raises(ConfigError, match=r"train\.masks_per_paragraph must be >= 2 for train\.objective=pretrainzero"):
        load_config(None, ["train.masks_per_paragraph=1"])
    with pytest.raises(ConfigError, match=r"train\.predictions_per_mask must be >= 2 for train\.objective=rpt"):
        load_config(None, ["train.objective=rpt", "train.predictions_per_mask=1"])
    assert load_config(None, ["rpt.top_entropy_frac=0.5"]).rpt.top_entropy_frac == 0.5


# ---------------------------------------------------------------- the preview tool
def test_preview_tasks_runs_on_the_shipped_sample(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "preview_tasks.py"), "--n", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.count("--- mask generation prompt ---") == 2
    assert text.count("Generate a mask to mask important words in the following paragraph, satisfying the "
                      "requirements below:\n") == 2
    assert "The final generated masked words must be placed inside \\mask{}." in text
    assert "There is a passage with masked words by [mask]:\n" in text
    assert "Please reason step by step, and put the predicted masked words within \\boxed{}." in text
    assert "Random-RLPT baseline prompt" in text


def test_preview_tasks_chat_template_and_default_n():
    out = subprocess.run([sys.executable, "tools/preview_tasks.py", "--template", "chat", "--seed", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--- mask generation prompt ---") == 3
    assert "<|im_start|>user\nGenerate a mask to mask important words" in out.stdout
