"""Prompt texts: the paper's two templates verbatim [PZ Fig. 5], the RPT prompt [RPT App. D, Table 10], chat wrapping.

Templates are kept as (prefix, suffix) around one slot and filled by concatenation, never ``str.format``: the
templates contain literal braces (``\\mask{}``) and paragraphs may contain anything.

Line breaks follow docs/method.md's blockquotes (one line per quoted line; the PDF's soft wraps inside a sentence
are joined). Wrapping (INFERENCE, method §6 item 11): ``style="plain"`` sends the text as is (the default, for
base models); ``style="chat"`` wraps it as one user turn, through the tokenizer's own chat template when one
is passed, otherwise through a built-in ChatML rendering (the Qwen3 format).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_pz.errors import ConfigError

PROMPT_STYLES = ("plain", "chat")

# ---------------------------------------------------------------- verbatim templates [PZ Fig. 5]
GENERATION_PREFIX = (
    "Generate a mask to mask important words in the following paragraph, satisfying the requirements below:\n"
    "1) The mask should mask one or more entities in the passage. The masked words should be continuous.\n"
    "2) The masked words should exactly match words in the original passage.\n"
    "3) The masked words could be predicted according to the context. The difficulty to predict should be "
    "moderately challenging for you, so the answer would be short and as unique as possible.\n"
    "Paragraph: "
)
GENERATION_SUFFIX = "\nThe final generated masked words must be placed inside \\mask{}."

# "[mask]" in the first line is the configured mask token (the paper's is "[mask]").
PREDICTION_PREFIX = "There is a passage with masked words by {mask_token}:\n"
PREDICTION_SUFFIX = "\nPlease reason step by step, and put the predicted masked words within \\boxed{}."

# ---------------------------------------------------------------- RPT prompt v0 [RPT App. D, Table 10]
RPT_PREFIX = (
    "Complete the given text under '### Context' by predicting the next token, and wrap it in '\\boxed{}'. "
    "Please reason step by step to find the most probable next token as the final answer, and enclose it in "
    "\\boxed{} (note: the token may begin with a space, e.g., \\boxed{ para} or \\boxed{ =}; do not use "
    "\\text{}).\n\n### Context\n"
)
RPT_SUFFIX = ""

ChatTemplateFn = Callable[[list[dict[str, str]]], str]
"""messages -> prompt text ending with the assistant turn opener, e.g.
``lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)``."""


@dataclass
class PromptConfig:
    """How prompts are rendered."""

    style: str = "plain"
    """"plain": the template text only (INFERENCE for base models); "chat": one user turn in a chat template."""
    system_prompt: str = ""
    """Chat style only: an optional system turn placed before the user turn ("" = none)."""
    gen_response_prefix: str = ""
    """Text the mask-generation response is forced to start with (appended after the assistant opener), e.g.
    ``"The masked words are: \\mask{"``. "" = none, the paper's setting. A small-model variant: SmolLM2-135M
    never writes a valid ``\\mask{span}`` on its own (0/32 with the Fig. 5 prompt, with or without a format
    system prompt or a one-shot example), but about 1 in 5 of its completions after this prefix is a verbatim
    span (docs/results.md). The prefix belongs to the prompt (never trained on) and is prepended to the
    response before ``\\mask{}`` is parsed."""
    pred_restate: bool = False
    """Force the prediction response to start with the masked sentence restated up to its first mask token
    (``restated_context``), so the model's next words are its answer. Off: the paper's setting. A small-model
    variant (docs/coldstart.md): with the paper prompt SmolLM2-135M gives a held-out one-word span probability
    of ~0 (E[mixed groups of 8] = 0.0); restated, it is the model's own next-word probability (mean 0.057,
    E[mixed of 8] = 0.15, of 16 = 0.21 on 64 held-out spans). The answer is then the continuation, not a
    ``\\boxed{}``: pair it with ``reward.pred_reward: continuation_match``. Like ``gen_response_prefix``, the
    restated text belongs to the prompt (never trained on)."""
    pred_cloze: bool = False
    """With ``pred_restate``: the prediction prompt as a plain-text cloze whatever ``style`` says (``cloze_prompt``):
    the text after the first mask, then the text before it, so that the model's next words are the span and no
    copy of the paragraph ending in a mask token precedes them. A small-model variant (docs/coldstart.md, "Cloze
    prompt"): the paper's template restated in a chat turn lets SmolLM2-135M put 29 % of its probability on copying
    the mask token itself; this layout gives 0.1 %, and E[mixed] on 64 held-out one-word spans rises from 0.15 to
    0.33 (groups of 8) and from 0.26 to 0.47 (groups of 32). The generation prompt keeps ``style``."""

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ConfigError(f"PromptConfig.style={self.style!r}: expected one of {PROMPT_STYLES}")
        if not isinstance(self.system_prompt, str):
            raise ConfigError(f"PromptConfig.system_prompt={self.system_prompt!r}: expected a string")
        if not isinstance(self.gen_response_prefix, str):
            raise ConfigError(f"PromptConfig.gen_response_prefix={self.gen_response_prefix!r}: expected a string")
        if not isinstance(self.pred_restate, bool):
            raise ConfigError(f"PromptConfig.pred_restate={self.pred_restate!r}: expected true/false")
        if not isinstance(self.pred_cloze, bool):
            raise ConfigError(f"PromptConfig.pred_cloze={self.pred_cloze!r}: expected true/false")
        if self.pred_cloze and not self.pred_restate:
            raise ConfigError("PromptConfig.pred_cloze=true renders the restated prompt as plain text: it needs "
                              "pred_restate=true")


def chatml(messages: Sequence[dict[str, str]]) -> str:
    """Built-in ChatML rendering (Qwen format) with the assistant turn opened, used when no tokenizer is given."""
    turns = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(turns) + "<|im_start|>assistant\n"


def wrap(text: str, cfg: PromptConfig, chat_template: ChatTemplateFn | None = None) -> str:
    """Apply the configured wrapping to a filled template: unchanged for "plain", one user turn for "chat"."""
    if cfg.style == "plain":
        return text
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    return (chat_template or chatml)(messages)


def generation_prompt(paragraph: str, cfg: PromptConfig, chat_template: ChatTemplateFn | None = None) -> str:
    """Mask-generation prompt for a paragraph [PZ Fig. 5, "Prompt for Mask Generation"], ending with
    ``cfg.gen_response_prefix`` (the start of the response, "" by default)."""
    return wrap(GENERATION_PREFIX + paragraph + GENERATION_SUFFIX, cfg, chat_template) + cfg.gen_response_prefix


def prediction_prompt(
    masked_paragraph: str,
    cfg: PromptConfig,
    chat_template: ChatTemplateFn | None = None,
    mask_token: str = "[mask]",
) -> str:
    """Mask-prediction prompt for a paragraph whose span was replaced by ``mask_token`` [PZ Fig. 5].

    ``mask_token`` is ``SpanConfig.mask_token`` (the one source of truth; the paper's is "[mask]"). With
    ``cfg.pred_restate`` the prompt ends with ``restated_context(masked_paragraph, mask_token)`` after the
    assistant opener (the forced start of the response); with ``cfg.pred_cloze`` it is ``cloze_prompt``.
    """
    if cfg.pred_cloze:
        return cloze_prompt(masked_paragraph, mask_token)
    prefix = PREDICTION_PREFIX.replace("{mask_token}", mask_token)
    prompt = wrap(prefix + masked_paragraph + PREDICTION_SUFFIX, cfg, chat_template)
    return prompt + restated_context(masked_paragraph, mask_token) if cfg.pred_restate else prompt


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n")


def restated_context(masked_paragraph: str, mask_token: str = "[mask]") -> str:
    """The sentence holding the first ``mask_token``, from its start up to the mask, trailing spaces dropped.

    "A b. The capital is [mask], a city." -> "The capital is". A sentence starts after the last ``.``/``!``/``?``
    (closing quotes or brackets allowed) followed by whitespace, or after a line break; a mask that opens its
    sentence gives "". No mask gives "" too: there is nothing to continue.
    """
    at = masked_paragraph.find(mask_token)
    if at < 0:
        return ""
    start = 0
    for m in _SENTENCE_END.finditer(masked_paragraph, 0, at):
        start = m.end()
    return masked_paragraph[start:at].rstrip()


CLOZE_LABEL = "Text:"


def cloze_prompt(masked_paragraph: str, mask_token: str = "[mask]") -> str:
    """The plain-text cloze of ``prompt.pred_cloze``: what follows the first mask, then what precedes it.

    "A b. The capital is [mask], a city." -> "Text: ..., a city.\\n\\nText: A b. The capital is". Later
    occurrences of the span stay masked in the first part; the second part holds none (the first mask is the first
    occurrence). The model sees the whole paragraph but the span, and its answer continues the second part. Without
    a mask the prompt is the paragraph after "Text:" (nothing to continue: any answer is wrong).
    """
    at = masked_paragraph.find(mask_token)
    if at < 0:
        return f"{CLOZE_LABEL} {masked_paragraph}"
    after = masked_paragraph[at + len(mask_token):]
    before = masked_paragraph[:at].rstrip()
    return f"{CLOZE_LABEL} ...{after}\n\n{CLOZE_LABEL} {before}".rstrip()


def next_token_prompt(context: str, cfg: PromptConfig, chat_template: ChatTemplateFn | None = None) -> str:
    """RPT next-token-reasoning prompt v0 for a truncated context [RPT App. D, Table 10]."""
    return wrap(RPT_PREFIX + context + RPT_SUFFIX, cfg, chat_template)


def template_overhead_tokens(
    count_tokens: Callable[[str], int], cfg: PromptConfig, chat_template: ChatTemplateFn | None = None
) -> int:
    """Tokens the longest PretrainZero template adds around a paragraph (for the corpus prompt-length cap).

    Measured as ``count_tokens(prompt("")``; BPE merges at the seams can shift the true count by a token or two,
    so the corpus filter keeps a small margin (``CorpusConfig.prompt_margin_tokens``).
    """
    return max(
        count_tokens(generation_prompt("", cfg, chat_template)),
        count_tokens(prediction_prompt("", cfg, chat_template)),
    )
