"""SGLang's OpenAI-compatible wire format (``sglang/srt/entrypoints/openai/protocol.py``): the request models of
``/v1/completions`` and ``/v1/chat/completions``, their sampling parameters, and the response shapes.

Why: lm-evaluation-harness (``local-completions``, ``local-chat-completions``) and other OpenAI clients then run
against the embedded server as they run against SGLang. Requests:

* every field declared here is SGLang's, with SGLang's name and default (checked against the source by
  ``tests/unit/test_rollout_openai_wire.py``); keys SGLang does not know are ignored, as SGLang ignores them;
* fields the embedded engine does not act on are accepted only at their neutral value (``NEUTRAL_COMPLETION``,
  ``NEUTRAL_CHAT``); another value answers 400 naming the field, since ignoring it would change what comes back
  (``stream=true``, ``best_of``, ``suffix``, grammars, penalties, tools, ...);
* values are typed strictly (``"1"`` is no integer), and ranges are ``/generate``'s (``wire_sampling.py``), with
  the message naming the OpenAI field (``max_tokens``, ``seed``);
* ``max_tokens=0`` is accepted with ``echo=true`` (score the prompt, generate nothing, as vLLM and OpenAI's
  legacy API allow); SGLang refuses it.

Log-probs (``logprobs=K`` on completions, ``logprobs``/``top_logprobs`` on chat) are the model's raw distribution
(temperature 1) at every returned token, prompt (``echo``) and completion alike, from one forward pass over prompt
+ completion. As in OpenAI's API, each ``top_logprobs`` entry holds the K most likely tokens and the chosen one
(so up to K + 1), and the first prompt token has ``None`` (no context). ``text_offset`` is each token's character
offset in the choice's ``text`` (SGLang sends -1).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from megatron_pz.engine.wire_requests import HTTPError, show
from megatron_pz.engine.wire_responses import PromptLogprobs
from megatron_pz.engine.token_text import TokenText
from megatron_pz.engine.wire_sampling import parse_sampling_params
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams

MAX_TOP_LOGPROBS = 20
"""Largest ``logprobs`` (completions) / ``top_logprobs`` (chat); OpenAI allows 5 and 20, SGLang has no limit."""

DEFAULT_MODEL_NAME = "default"  # protocol.DEFAULT_MODEL_NAME

# Accepted only at these values (None also passes): SGLang fields the embedded engine does not implement.
NEUTRAL_COMMON: dict[str, Any] = {
    "stream": False, "logit_bias": {}, "return_hidden_states": False, "return_routed_experts": False,
    "lora_path": None, "session_id": None, "session_params": None, "response_format": None,
    "custom_logit_processor": None}
NEUTRAL_COMPLETION: dict[str, Any] = {**NEUTRAL_COMMON, "best_of": 1, "suffix": None}
NEUTRAL_CHAT: dict[str, Any] = {**NEUTRAL_COMMON, "tools": None, "reasoning_effort": None, "thinking": None}


class _Request(BaseModel):
    """Strict types: a client sending ``"max_tokens": "16"`` hears about it instead of getting a coerced guess."""

    model_config = ConfigDict(strict=True)

    model: str = DEFAULT_MODEL_NAME
    """Echoed in the response; any name is served by this server's one model."""
    frequency_penalty: float = 0.0
    logit_bias: Any = None
    n: int = 1
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: Any = None
    user: str | None = None
    return_hidden_states: Any = False
    return_routed_experts: bool = False
    min_tokens: int = 0
    regex: Any = None
    ebnf: Any = None
    stop_token_ids: list[int] | None = None
    stop_regex: Any = None
    no_stop_trim: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    lora_path: Any = None
    session_id: str | None = None
    session_params: Any = None
    response_format: Any = None
    custom_params: Any = None
    custom_logit_processor: Any = None
    watermark: Any = None
    rid: Any = None


class CompletionRequest(_Request):
    """``/v1/completions`` (protocol.CompletionRequest)."""

    prompt: Any
    """A string, a list of strings, a list of token ids, or a list of such lists (one choice group each)."""
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int = 16
    suffix: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    json_schema: Any = None
    repetition_penalty: float = 1.0
    return_token_ids: bool = False

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[str] | list[int] | list[list[int]]:
        def ids(v: Any) -> bool:
            return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str) or ids(value):
            return value
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value) or all(map(ids, value))):
            return value
        raise ValueError("prompt must be a string, a list of strings, a non-empty list of token ids, or a list of "
                         "such lists")


class ChatCompletionRequest(_Request):
    """``/v1/chat/completions`` (protocol.ChatCompletionRequest); the prompt is the tokenizer's chat template over
    ``messages`` (or ``input_ids``, which SGLang takes as the templated prompt)."""

    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    """None (with ``max_tokens`` None): up to the model's context, as SGLang."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    tools: Any = None
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    reasoning_effort: Any = None
    thinking: Any = None
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    input_ids: list[int] | None = None


def refuse_unsupported(req: _Request, neutral: dict[str, Any]) -> None:
    """HTTPError(400) naming the first field set away from its neutral value (spelled as JSON spells it)."""
    for name, ok in neutral.items():
        value = getattr(req, name)
        if value is not None and value != ok:
            shown = json.dumps(value) if isinstance(value, bool) else show(value)
            raise HTTPError(400, f"{name}={shown} is not supported by the embedded engine")


# sampling_params names in /generate's messages -> the OpenAI field a client sent
_FIELD_NAMES = {"max_new_tokens": "max_tokens", "sampling_seed": "seed", "min_new_tokens": "min_tokens"}


def sampling_params(req: _Request, max_new_tokens: int, temperature: float | None, top_p: float | None,
                    top_k: int | None, max_n: int) -> SamplingParams:
    """The request's sampling as /generate would parse it (same checks), messages naming the OpenAI fields."""
    raw = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
           "n": req.n, "stop": req.stop, "stop_token_ids": req.stop_token_ids, "ignore_eos": req.ignore_eos,
           "sampling_seed": req.seed, "skip_special_tokens": req.skip_special_tokens,
           "min_new_tokens": req.min_tokens, "frequency_penalty": req.frequency_penalty,
           "presence_penalty": req.presence_penalty, "regex": req.regex, "ebnf": req.ebnf,
           "stop_regex": req.stop_regex, "no_stop_trim": req.no_stop_trim, "custom_params": req.custom_params,
           "watermark": req.watermark}
    for name in ("min_p", "repetition_penalty", "json_schema"):
        if hasattr(req, name):
            raw[name] = getattr(req, name)
    try:
        return parse_sampling_params(raw, max_n)
    except HTTPError as exc:
        message = str(exc).replace("invalid sampling_params: ", "invalid request: ")
        for ours, theirs in _FIELD_NAMES.items():
            message = message.replace(f"sampling_params.{ours}", theirs)
        raise HTTPError(exc.status, message.replace("sampling_params.", "")) from None


def check_top_logprobs(value: int | None, name: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise HTTPError(400, f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Choice:
    """One returned sequence: its prompt, the generation (None when nothing was generated: ``max_tokens=0``) and the
    log-prob rows of prompt + completion (None when not asked for)."""

    prompt: list[int]
    result: GenerationResult | None
    rows: PromptLogprobs | None = None

    @property
    def completion_ids(self) -> list[int]:
        return list(self.result.response_ids) if self.result is not None else []


def finish(choice: Choice) -> tuple[str, int | str | None]:
    """(finish_reason, matched_stop) as SGLang's choices carry them."""
    res = choice.result
    if res is None:
        return "length", None
    return res.finish_reason, res.matched_stop if res.finish_reason == "stop" else None


def _positions(rows: PromptLogprobs, start: int, top_k: int) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
    """(token id, log-prob, the ``top_k`` most likely (id, log-prob), descending) of each position from ``start``."""
    out = []
    for t in range(start, len(rows.token_ids)):
        lp = rows.token_logprobs[t]
        top = [(int(i), float(v)) for v, i in (rows.top[t] or [])][:top_k] if rows.top is not None and top_k else []
        out.append((rows.token_ids[t], None if lp is None else float(lp), top))
    return out


def completion_logprobs(choice: Choice, echo: bool, top_k: int, token_text: TokenText) -> dict:
    """protocol.LogProbs of one choice: the echoed prompt's tokens (``echo``) and the completion's. Each
    ``top_logprobs`` entry maps the text of the ``top_k`` most likely tokens and of the chosen one to its log-prob
    (a text shared by several tokens keeps the largest); None at the first prompt token."""
    tokens, logprobs, tops, offsets, at = [], [], [], [], 0
    for tok, lp, top in _positions(choice.rows, 0 if echo else len(choice.prompt), top_k):
        text = token_text.text(tok)
        entry: dict[str, float] | None = None
        if lp is not None:
            entry = {}
            for other, value in top + [(tok, lp)]:
                entry.setdefault(token_text.text(other), value)
        tokens.append(text)
        logprobs.append(lp)
        tops.append(entry)
        offsets.append(at)
        at += len(text)
    return {"text_offset": offsets, "token_logprobs": logprobs, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(choice: Choice, top_k: int, token_text: TokenText) -> dict:
    """protocol.ChoiceLogprobs: the completion's tokens, each with its ``top_k`` most likely alternatives."""
    def entry(tok: int, lp: float) -> dict:
        text, raw = token_text(tok)
        return {"token": text, "bytes": raw, "logprob": lp}

    return {"content": [{**entry(tok, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for tok, lp, top in _positions(choice.rows, len(choice.prompt), top_k)]}


def usage(choices: list[Choice], n: int) -> dict:
    """protocol.UsageInfo: each prompt counted once (not once per sample), every completion token."""
    prompt = sum(len(c.prompt) for c in choices[::n])
    completion = sum(len(c.completion_ids) for c in choices)
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            "prompt_tokens_details": None, "reasoning_tokens": 0, "completion_tokens_details": None}


def response(kind: str, model: str, choices: list[dict], usage_info: dict, weight_version: int) -> dict:
    """protocol.CompletionResponse (``kind`` "text_completion") / ChatCompletionResponse ("chat.completion")."""
    return {"id": uuid.uuid4().hex, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage_info, "metadata": {"weight_version": str(weight_version)}}


def model_list(name: str, max_model_len: int | None) -> dict:
    """protocol.ModelList with this server's one ModelCard (SGLang's ``/v1/models``)."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                        "owned_by": "sglang", "root": name, "parent": None,
                                        "max_model_len": max_model_len}]}
