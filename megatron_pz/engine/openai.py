"""SGLang's OpenAI-compatible endpoints on the embedded server: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``. Request models and response shapes are ``wire_openai.py``.

They run on ``/generate``'s machinery: the same prompt limits and checks (``Endpoints``), the same batcher (so
OpenAI requests merge and take turns with ``/generate`` ones), and the engine's ``prompt_logprobs`` for the
log-probs: one forward pass over each distinct prompt + completion, after the completion is generated. A
completion therefore equals ``/generate``'s for the same prompt and sampling parameters, and an echoed prompt's
log-probs equal ``/generate``'s ``input_token_logprobs``.

Chat renders ``messages`` with the tokenizer's chat template (``add_generation_prompt``, or
``continue_final_message``), as SGLang does for a model without a custom template; ``input_ids`` replaces the
rendered prompt. Text content parts are joined with spaces (SGLang's "string" content format); other parts
(images, audio) answer 400.
"""
from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import Response

from megatron_pz.engine.replies import reply
from megatron_pz.engine.token_text import TokenText

from megatron_pz.engine.wire_openai import (
    NEUTRAL_CHAT,
    NEUTRAL_COMPLETION,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    chat_logprobs,
    check_top_logprobs,
    completion_logprobs,
    finish,
    model_list,
    refuse_unsupported,
    response,
    sampling_params,
    usage,
)
from megatron_pz.engine.wire_requests import HTTPError, show
from megatron_pz.errors import UserError
from megatron_pz.rollout.protocol import SamplingParams

# protocol._GENERIC_MESSAGE_ROLES and "user"
ROLES = ("system", "user", "assistant", "tool", "function", "developer", "latest_reminder", "root")


class OpenAIEndpoints:
    """The ``/v1/*`` handlers over the native endpoints' engine, batcher and limits."""

    def __init__(self, native: Any):
        """``native``: the server's ``Endpoints`` (engine, batcher, limits, prompt checks)."""
        self.native = native
        self._tt: TokenText | None = None

    def routes(self) -> list[tuple[tuple[str, ...], str, Any]]:
        return [(("POST",), "/v1/completions", self.completions),
                (("POST",), "/v1/chat/completions", self.chat_completions),
                (("GET",), "/v1/models", self.models)]

    @property
    def engine(self) -> Any:
        return self.native.engine

    @property
    def _token_text(self) -> TokenText:
        """Per tokenizer object: a weight update keeps it, and a test may swap it."""
        tokenizer = self.engine.tokenizer
        if self._tt is None or self._tt.tokenizer is not tokenizer:
            self._tt = TokenText(tokenizer)
        return self._tt

    def _decode(self, ids: list[int]) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""

    # ---------------------------------------------------------------- endpoints

    async def models(self) -> Response:
        return reply(200, model_list(self.engine.model_path, self.engine.max_positions))

    async def completions(self, req: CompletionRequest) -> Response:
        refuse_unsupported(req, NEUTRAL_COMPLETION)
        top_k = check_top_logprobs(req.logprobs, "logprobs")
        if req.max_tokens < 0 or (req.max_tokens == 0 and not req.echo):
            raise HTTPError(400, f"max_tokens must be positive (0 only with echo=true, to score the prompt), got "
                                 f"{req.max_tokens}")
        prompt = req.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], str):
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts = self.native.encode_texts(texts, "prompt")
        else:
            prompts = self.native.check_token_prompts([prompt] if isinstance(prompt[0], int) else prompt, "prompt")
            texts = None
        params = sampling_params(req, max(req.max_tokens, 1), req.temperature, req.top_p, req.top_k,
                                 self.native.limits.max_n)
        choices = await self._run(prompts, params, req.max_tokens > 0, top_k)
        items = []
        for index, c in enumerate(choices):
            text = (c.result.text or "") if c.result is not None else ""
            if req.echo:
                i = index // params.n
                text = (texts[i] if texts is not None else self._decode(prompts[i])) + text
            reason, matched = finish(c)
            item = {"index": index, "text": text,
                    "logprobs": None if top_k is None else completion_logprobs(c, req.echo, top_k, self._token_text),
                    "finish_reason": reason, "matched_stop": matched}
            if req.return_token_ids:
                item.update(token_ids=c.completion_ids, prompt_token_ids=c.prompt)
            items.append(item)
        return reply(200, response("text_completion", req.model, items, usage(choices, params.n),
                                   self._version(choices)))

    async def chat_completions(self, req: ChatCompletionRequest) -> Response:
        refuse_unsupported(req, NEUTRAL_CHAT)
        top_k = check_top_logprobs(req.top_logprobs, "top_logprobs")
        if top_k and not req.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs=true")
        if req.input_ids is not None:
            if not req.input_ids:
                raise HTTPError(400, "input_ids must be a non-empty list of token ids")
            prompt = self.native.check_token_prompts([req.input_ids], "input_ids")[0]
        else:
            prompt = self.native.encode_texts([self._render(req)], "messages", add_special_tokens=False)[0]
        max_new = req.max_completion_tokens or req.max_tokens
        if max_new is None:  # SGLang: whatever the context leaves
            max_new = max(1, (self.engine.max_positions or len(prompt) + 1) - len(prompt))
        params = sampling_params(req, max_new, 1.0 if req.temperature is None else req.temperature,
                                 1.0 if req.top_p is None else req.top_p, -1 if req.top_k is None else req.top_k,
                                 self.native.limits.max_n)
        choices = await self._run([prompt], params, True, (top_k or 0) if req.logprobs else None)
        items = []
        for index, c in enumerate(choices):
            reason, matched = finish(c)
            items.append({"index": index,
                          "message": {"role": "assistant", "content": c.result.text or "", "reasoning_content": None},
                          "logprobs": chat_logprobs(c, top_k or 0, self._token_text) if req.logprobs else None,
                          "finish_reason": reason, "matched_stop": matched})
        return reply(200, response("chat.completion", req.model, items, usage(choices, params.n),
                                   self._version(choices)))

    # ---------------------------------------------------------------- shared

    def _render(self, req: ChatCompletionRequest) -> str:
        """The chat template over ``messages``: 400 for a malformed message or a tokenizer without a template."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise HTTPError(400, "this server's tokenizer has no chat template: use /v1/completions")
        if not req.messages:
            raise HTTPError(400, "messages must not be empty")
        messages = [_message(m, i) for i, m in enumerate(req.messages)]
        if req.continue_final_message and messages[-1]["role"] != "assistant":
            raise HTTPError(400, "continue_final_message=true needs an assistant message last")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=not req.continue_final_message,
                                                 continue_final_message=req.continue_final_message,
                                                 **(req.chat_template_kwargs or {}))
        except Exception as exc:  # noqa: BLE001 - a template raising on these messages is the request's error
            raise HTTPError(400, f"the chat template failed on these messages: {type(exc).__name__}: {exc}") \
                from None

    async def _run(self, prompts: list[list[int]], params: SamplingParams, generate: bool,
                   top_k: int | None) -> list[Choice]:
        """``params.n`` choices per prompt (prompt-major, as SGLang orders them): generated through the batcher
        when ``generate``, with log-prob rows over prompt + completion when ``top_k`` is not None."""
        try:
            for p in prompts:  # per prompt, before the batcher merges this request with others
                if generate:
                    self.engine.check_prompts([p], params)
            if generate:
                groups = await asyncio.wrap_future(self.native.batcher.submit(prompts, params))
            else:
                groups = [[None] * params.n for _ in prompts]
            choices = [Choice(list(p), r) for p, group in zip(prompts, groups) for r in group]
            if top_k is not None:
                distinct = list(dict.fromkeys(tuple(c.prompt + c.completion_ids) for c in choices))
                rows = await asyncio.to_thread(self.engine.prompt_logprobs, [list(s) for s in distinct], top_k)
                by_seq = dict(zip(distinct, rows))
                for c in choices:
                    c.rows = by_seq[tuple(c.prompt + c.completion_ids)]
        except UserError as exc:
            raise HTTPError(400, str(exc)) from None
        return choices

    def _version(self, choices: list[Choice]) -> int:
        done = [c.result.weight_version for c in choices if c.result is not None]
        return done[0] if done else self.engine.weight_version()


def _message(m: dict[str, Any], i: int) -> dict[str, Any]:
    """One chat message for the template: role lower-cased, text parts joined; 400 naming what is wrong."""
    role = m.get("role")
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise HTTPError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {show(role)}")
    content = m.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in ("text", "input_text")
                    and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else part
                raise HTTPError(400, f"messages[{i}].content[{j}]: only text parts are supported by the embedded "
                                     f"engine, got {show(kind)}")
            parts.append(part["text"])
        content = " ".join(parts)
    elif content is not None and not isinstance(content, str):
        raise HTTPError(400, f"messages[{i}].content must be a string, a list of text parts or null, got "
                             f"{show(content)}")
    return {**m, "role": role.lower(), "content": content}
