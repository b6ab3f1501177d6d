"""Task builders: PretrainZero generator/predictor Samples, Random-RLPT and RPT next-token baselines, preview tool."""
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pz.data.corpus import Paragraph
from megatron_pz.data.prompts import PromptConfig, generation_prompt, next_token_prompt, prediction_prompt
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig
from megatron_pz.config import load_config
from megatron_pz.data.tasks import (
    OBJECTIVES,
    TRAINABLE_OBJECTIVES,
    NextTokenConfig,
    check_objective,
    generation_samples,
    next_token_samples,
    prediction_samples,
    random_span_samples,
    select_entropy_positions,
)
from megatron_pz.errors import ConfigError
from megatron_pz.rewards.rpt import rpt_prefix
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


# ---------------------------------------------------------------- entropy positions
ENT = [9.0, 0.1, 5.0, 0.2, 4.0, 0.3, 3.0, 0.4, 2.0, 0.5, 1.0]  # T = 11, predictable positions 1..10


def positions(entropies=ENT, seed=0, eligible=None, **kw):
    cfg = NextTokenConfig(**{"min_context_tokens": 1, "positions_per_paragraph": 10, **kw})
    return select_entropy_positions(entropies, cfg, random.Random(seed), eligible)


def test_top_20_percent_entropy_positions():
    # top ceil(0.2 * 10) = 2 of positions 1..10: entropies 5.0 (pos 2) and 4.0 (pos 4); position 0 never counts
    assert positions() == [2, 4]
    assert positions(top_entropy_frac=0.5) == [2, 4, 6, 8, 10]
    assert positions(min_context_tokens=3) == [4]
    assert positions(eligible=[True] * 4 + [False] * 7) == [2]
    assert positions(entropies=[0.0] + [1.0] * 4, top_entropy_frac=0.5) == [1, 2]  # ties: earlier first
    nan_at_2 = list(ENT)
    nan_at_2[2] = float("nan")
    assert positions(entropies=nan_at_2) == [4, 6]
    assert positions(entropies=[1.0]) == []


def test_entropy_position_draw_is_seeded():
    draws = {tuple(positions(seed=s, positions_per_paragraph=1)) for s in range(20)}
    assert draws == {(2,), (4,)}
    assert positions(seed=3, positions_per_paragraph=1) == positions(seed=3, positions_per_paragraph=1)


# ---------------------------------------------------------------- next-token samples
def test_next_token_samples_hand_computed():
    para = Paragraph("p", "t", "The cat sat.")
    ends = [3, 7, 11, 12]  # tokens "The", " cat", " sat", "."
    cfg = NextTokenConfig(min_context_tokens=1)
    samples = next_token_samples(para, ends, [0.0, 0.5, 3.0, 0.1], "ntp/p", 4, cfg, PLAIN, random.Random(0))
    assert len(samples) == 4 and {s.group_id for s in samples} == {"ntp/p/pos2"}
    m = samples[0].metadata
    assert (m["position"], m["context"], m["target"], m["gt_token_byte_ends"]) == (2, "The cat", " sat.", [4, 5])
    assert samples[0].prompt_text == next_token_prompt("The cat", PLAIN)
    assert samples[0].task is Task.NEXT_TOKEN
    assert rpt_prefix("\\boxed{ sat}", m["target"], gt_token_byte_ends=m["gt_token_byte_ends"]) == 1.0
    assert rpt_prefix("\\boxed{ sa}", m["target"], gt_token_byte_ends=m["gt_token_byte_ends"]) == 0.0
    short = next_token_samples(para, ends, [0.0, 0.5, 3.0, 0.1], "n", 1, NextTokenConfig(min_context_tokens=1,
                               max_target_tokens=1), PLAIN, random.Random(0))
    assert (short[0].metadata["target"], short[0].metadata["gt_token_byte_ends"]) == (" sat", [4])


def test_next_token_skips_positions_inside_a_utf8_character():
    para = Paragraph("p", "t", "aé b")  # bytes: a | c3 | a9 | ' ' b  -> a token boundary inside "é"
    ends = [1, 2, 3, 5]
    cfg = NextTokenConfig(min_context_tokens=1, top_entropy_frac=1.0, positions_per_paragraph=3)
    samples = next_token_samples(para, ends, [0.0, 1.0, 9.0, 2.0], "n", 1, cfg, PLAIN, random.Random(0))
    assert [s.metadata["position"] for s in samples] == [1, 3]
    assert [s.metadata["context"] for s in samples] == ["a", "aé"]


def test_next_token_input_validation():
    para = Paragraph("p", "t", "abc")
    with pytest.raises(ValueError, match="differ in length"):
        next_token_samples(para, [1, 3], [0.0], "n", 1, NextTokenConfig(), PLAIN, random.Random(0))
    with pytest.raises(ValueError, match="strictly increasing"):
        next_token_samples(para, [2, 2, 3], [0.0] * 3, "n", 1, NextTokenConfig(), PLAIN, random.Random(0))
    with pytest.raises(ValueError, match="strictly increasing"):
        next_token_samples(para, [1, 2], [0.0] * 2, "n", 1, NextTokenConfig(), PLAIN, random.Random(0))


@pytest.mark.parametrize("cls, kwargs, field", [
    (NextTokenConfig, {"top_entropy_frac": 0.0}, "top_entropy_frac"),
    (NextTokenConfig, {"max_target_tokens": 0}, "max_target_tokens")])
def test_task_config_validation(cls, kwargs, field):
    with pytest.raises(ConfigError, match=f"{cls.__name__}.{field}"):
        cls(**kwargs)


def test_one_objective_list_with_one_name_each():
    """The objective and the GRPO group sizes are named once, in `train` (the TaskConfig duplicate is gone)."""
    from megatron_pz.trainer.collect import COLLECTORS

    assert tuple(OBJECTIVES) == ("pretrainzero", "random_span", "next_token")
    assert tuple(COLLECTORS) == TRAINABLE_OBJECTIVES == ("pretrainzero", "random_span")
    for name in TRAINABLE_OBJECTIVES:
        assert check_objective(name) == name
    with pytest.raises(ConfigError, match=r"train\.objective must be pretrainzero or random_span, got 'rpt'"):
        check_objective("rpt")
    with pytest.raises(ConfigError, match=r"train\.objective=next_token \(RPT .*\) is not trainable yet"):
        load_config(None, ["train.objective=next_token"])
    t = load_config(None).train  # defaults: the paper's group sizes [PZ §4.1]
    assert (t.objective, t.masks_per_paragraph, t.predictions_per_mask) == ("pretrainzero", 8, 8)


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
