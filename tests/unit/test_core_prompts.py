"""Prompt templates: verbatim Fig. 5 text, RPT v0 prompt, plain vs chat wrapping."""
import pytest

from megatron_pz.data.prompts import (
    cloze_prompt,
    PromptConfig,
    chatml,
    generation_prompt,
    next_token_prompt,
    prediction_prompt,
    template_overhead_tokens,
)
from megatron_pz.errors import ConfigError

PLAIN = PromptConfig()

# The paper's text [PZ Fig. 5], typed out here independently of the module (long lines are verbatim).
# ruff: noqa: E501
EXPECTED_GENERATION = """Generate a mask to mask important words in the following paragraph, satisfying the requirements below:
1) The mask should mask one or more entities in the passage. The masked words should be continuous.
2) The masked words should exactly match words in the original passage.
3) The masked words could be predicted according to the context. The difficulty to predict should be moderately challenging for you, so the answer would be short and as unique as possible.
Paragraph: Ralph Hanover won seventeen additional stakes events.
The final generated masked words must be placed inside \\mask{}."""

EXPECTED_PREDICTION = """There is a passage with masked words by [mask]:
Ralph Hanover won seventeen additional [mask] events.
Please reason step by step, and put the predicted masked words within \\boxed{}."""


def test_generation_prompt_is_verbatim():
    assert generation_prompt("Ralph Hanover won seventeen additional stakes events.", PLAIN) == EXPECTED_GENERATION


def test_prediction_prompt_is_verbatim():
    assert prediction_prompt("Ralph Hanover won seventeen additional [mask] events.", PLAIN) == EXPECTED_PREDICTION


def test_prediction_prompt_names_the_configured_mask_token():
    text = prediction_prompt("a <M> b", PLAIN, mask_token="<M>")
    assert text.startswith("There is a passage with masked words by <M>:\na <M> b\n")


def test_paragraph_with_braces_and_placeholders_is_inserted_literally():
    weird = "{paragraph} {} \\mask{x} <paragraph> {mask_token}"
    assert generation_prompt(weird, PLAIN).count(weird) == 1
    assert prediction_prompt(weird, PLAIN).split("\n")[1] == weird


def test_rpt_prompt_v0():
    text = next_token_prompt("The capital of France is", PLAIN)
    assert text.startswith(
        "Complete the given text under '### Context' by predicting the next token, and wrap it in '\\boxed{}'. "
        "Please reason step by step to find the most probable next token as the final answer, and enclose it in "
        "\\boxed{} (note: the token may begin with a space, e.g., \\boxed{ para} or \\boxed{ =}; do not use "
        "\\text{})."
    )
    assert text.endswith("### Context\nThe capital of France is")


def test_chat_wrapping_builtin_chatml():
    cfg = PromptConfig(style="chat")
    assert prediction_prompt("p [mask]", cfg) == (
        "<|im_start|>user\n" + prediction_prompt("p [mask]", PLAIN) + "<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = PromptConfig(style="chat", system_prompt="You are helpful.")
    assert generation_prompt("p", with_system).startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n")


def test_chat_wrapping_uses_the_given_template():
    seen = []

    def template(messages):
        seen.append(messages)
        return "<chat>" + messages[-1]["content"] + "</chat>"

    out = generation_prompt("p", PromptConfig(style="chat"), chat_template=template)
    assert out == "<chat>" + generation_prompt("p", PLAIN) + "</chat>"
    assert seen == [[{"role": "user", "content": generation_prompt("p", PLAIN)}]]
    # plain style ignores the chat template
    assert generation_prompt("p", PLAIN, chat_template=template) == generation_prompt("p", PLAIN)


def test_chatml_format():
    assert chatml([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_overhead_counts_the_longest_template():
    words = lambda s: len(s.split())  # noqa: E731
    gen_words = len(generation_prompt("", PLAIN).split())
    pred_words = len(prediction_prompt("", PLAIN).split())
    assert gen_words > pred_words
    assert template_overhead_tokens(words, PLAIN) == gen_words


@pytest.mark.parametrize("kwargs", [{"style": "html"}, {"system_prompt": None}])
def test_prompt_config_validation(kwargs):
    with pytest.raises(ConfigError, match="PromptConfig." + next(iter(kwargs))):
        PromptConfig(**kwargs)


# ---------------------------------------------------------------- restated context (prompt.pred_restate)
from megatron_pz.data.prompts import restated_context  # noqa: E402


def test_restated_context_is_the_masks_sentence_up_to_the_mask():
    assert restated_context("A b. The capital is [mask], a city.") == "The capital is"
    assert restated_context("One! Two? Three [mask] four") == "Three"
    assert restated_context('He said "no." Then [mask] ran') == "Then"  # closing quote ends the sentence
    assert restated_context("x\ny [mask]") == "y"
    assert restated_context("Version 3.5 of [mask] shipped") == "Version 3.5 of"  # no space after the dot
    assert restated_context("[mask] is first") == ""
    assert restated_context("no mask here") == ""
    # Only the first occurrence counts: every occurrence is masked, the first one is the one to continue.
    assert restated_context("The [mask] met. Later [mask] left", "[mask]") == "The"
    assert restated_context("The <M> met", "<M>") == "The"


def test_pred_restate_appends_the_context_after_the_assistant_opener():
    plain = PromptConfig(style="chat")
    restate = PromptConfig(style="chat", pred_restate=True)
    masked = "Rome is old. The capital of Italy is [mask]."
    base = prediction_prompt(masked, plain)
    assert prediction_prompt(masked, restate) == base + "The capital of Italy is"
    assert base.endswith("<|im_start|>assistant\n")


def test_pred_cloze_puts_the_text_after_the_mask_first_whatever_the_style():
    masked = "Rome is old. The capital of Italy is [mask], by the [mask] river."
    want = "Text: ..., by the [mask] river.\n\nText: Rome is old. The capital of Italy is"
    for style in ("chat", "plain"):
        assert prediction_prompt(masked, PromptConfig(style=style, pred_restate=True, pred_cloze=True)) == want
    assert cloze_prompt("[mask] opens it.") == "Text: ... opens it.\n\nText:"  # nothing before: the answer opens
    assert cloze_prompt("Ends with [mask]") == "Text: ...\n\nText: Ends with"
    assert cloze_prompt("A <M> b", "<M>") == "Text: ... b\n\nText: A"
    assert cloze_prompt("no mask") == "Text: no mask"
    # The generation prompt keeps the chat turn.
    assert generation_prompt("x", PromptConfig(style="chat", pred_restate=True, pred_cloze=True)).startswith(
        "<|im_start|>user")
    with pytest.raises(ConfigError, match="pred_cloze=true .* needs pred_restate=true"):
        PromptConfig(pred_cloze=True)
    with pytest.raises(ConfigError, match="pred_cloze"):
        PromptConfig(pred_restate=True, pred_cloze=1)


def test_pred_restate_must_be_a_bool():
    with pytest.raises(ConfigError, match="pred_restate"):
        PromptConfig(pred_restate="yes")
