"""SGLang's ``/generate`` response items: one ``{"text", "output_ids", "meta_info"}`` dict per sample, with the
finish reason, log-probs (the response's and, when asked, the prompt's own) and routed experts laid out as SGLang
lays them out (see ``engine/wire.py`` for the sources)."""
from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_pz.rollout.protocol import GenerationResult


def finish_reason_json(result: GenerationResult) -> dict:
    """SGLang's FINISH_*.to_json() (sglang/srt/managers/schedule_batch.py)."""
    if result.finish_reason == "stop":
        return {"type": "stop", "matched": result.matched_stop}
    if result.finish_reason == "length":
        return {"type": "length", "length": len(result.response_ids)}
    return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


@dataclass
class PromptLogprobs:
    """One prompt's own log-probs (``logprob_start_len=0``): index t is token t given tokens < t (None at 0)."""

    token_ids: list[int]
    token_logprobs: list[float | None]
    top: list[list[tuple[float, int]] | None] | None = None
    """The top-K (log-prob, token id) of each position, descending; None when ``top_logprobs_num`` is 0."""


def _entry(lp: float | None, tok: int, token_text: Callable[[int], str] | None) -> list:
    return [None if lp is None else float(lp), int(tok), token_text(tok) if token_text else None]


def routed_experts_b64(routed: Any, start_len: int = 0) -> str:
    """SGLang's ``meta_info.routed_experts``: the rows from ``start_len`` on, as int32 bytes in base64."""
    return base64.b64encode(np.ascontiguousarray(np.asarray(routed)[start_len:], dtype=np.int32).tobytes()).decode()


def generate_response_item(result: GenerationResult, prompt_len: int, return_logprob: bool,
                           token_text: Callable[[int], str] | None, prompt: PromptLogprobs | None = None,
                           routed_experts_start_len: int | None = None) -> dict:
    """One ``/generate`` output dict, shaped like SGLang's (see module docstring); ``prompt``: the prompt's own
    log-probs when the request asked for them; ``routed_experts_start_len``: the request asked for the routing
    (None: it did not)."""
    version = str(result.weight_version)
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "finish_reason": finish_reason_json(result),
        "prompt_tokens": prompt_len,
        "weight_version": version,
        "completion_tokens": len(result.response_ids),
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "weight_versions": [{"version": version, "start": 0, "end": len(result.response_ids)}],
        "e2e_latency": float(result.extra.get("e2e_latency", 0.0)),
    }
    if return_logprob:
        meta["input_token_logprobs"] = [] if prompt is None else [
            _entry(lp, tok, token_text) for lp, tok in zip(prompt.token_logprobs, prompt.token_ids)]
        if prompt is not None and prompt.top is not None:
            meta["input_top_logprobs"] = [
                None if row is None else [_entry(lp, tok, token_text) for lp, tok in row] for row in prompt.top]
        meta["output_token_logprobs"] = [_entry(lp, tok, token_text)
                                         for lp, tok in zip(result.logprobs, result.response_ids)]
        meta["output_token_logprobs_length"] = len(result.response_ids)
    if routed_experts_start_len is not None and result.routed_experts is not None:
        meta["routed_experts"] = routed_experts_b64(result.routed_experts, routed_experts_start_len)
    return {"text": result.text or "", "output_ids": list(result.response_ids), "meta_info": meta}
