"""SGLang's wire format: pydantic request models, sampling-parameter parsing, ``/generate`` response items.

Why mirror SGLang exactly: CI and laptops then exercise the very client (``rollout/sglang_client.py``) that talks to
SGLang in production. Shapes are taken from the pinned SGLang release (0.5.23):

* requests: the ``*ReqInput`` classes of ``sglang/srt/managers/io_struct.py`` (same names, same fields, same
  defaults; the fields the embedded engine does not act on are accepted and ignored, like unknown keys);
  sampling params: ``SamplingParams`` (``sglang/srt/sampling/sampling_params.py``); unknown sampling keys are
  rejected like the JSON contract gate does (``sglang/api/v1/api_types.py``: "SamplingParams: unknown keys
  rejected");
* prompt log-probs: with ``return_logprob`` and ``logprob_start_len=0``, ``meta_info.input_token_logprobs`` has one
  ``[logprob, token_id, text]`` per prompt token and, with ``top_logprobs_num=K > 0``, ``input_top_logprobs`` one
  row of K such entries per prompt token, both ``None`` at the first token (no context), as SGLang's
  ``SchedulerLogprobResultProcessor`` lays them out. Other ``logprob_start_len`` values are refused (400), and
  ``output_top_logprobs`` is not computed (the rollout client never asks for it);
* routed experts (MoE, ``return_routed_experts``): ``meta_info.routed_experts`` is a base64 string of int32 ids,
  row-major ``(prompt + response - 1 - routed_experts_start_len, layers, top_k)``: every fed token (the last
  response token is never fed), each layer's top-k expert ids (``RoutedExpertsCapturer`` in
  ``sglang/srt/state_capturer/routed_experts.py``, ``_maybe_collect_routed_experts`` in
  ``sglang/srt/managers/scheduler_components/batch_result_processor.py``, base64 in ``DetokenizerManager``);
* ``/generate`` response: one dict per sample (a list for batch input, prompt-major with ``n`` samples per prompt,
  as ``TokenizerManager._handle_batch_request`` orders them), each ``{"text", "output_ids", "meta_info"}``;
  ``meta_info`` as built in ``TokenizerManager._handle_batch_output`` (``sglang/srt/managers/tokenizer_manager.py``):
  ``id, finish_reason, prompt_tokens, weight_version (str), completion_tokens, cached_tokens, e2e_latency`` and,
  with ``return_logprob``, ``output_token_logprobs`` as ``[[logprob, token_id, text_or_null], ...]``
  (``detokenize_logprob_tokens``). ``finish_reason`` is ``{"type": "stop", "matched": id_or_str}``,
  ``{"type": "length", "length": n}`` or ``{"type": "abort", "message": ...}`` (``FINISH_*.to_json`` in
  ``sglang/srt/managers/schedule_batch.py``).

Where we are stricter or looser than SGLang, the field says why.
"""
from __future__ import annotations

import base64
import math
import reprlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, field_validator

from megatron_pz.errors import UserError
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams
from megatron_pz.rollout.updater import PARTIAL_VERSION_SUFFIX

# SGLang sampling keys we honour, and those we accept only at their neutral value (anything else: 400).
SUPPORTED_SAMPLING = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids",
                                "ignore_eos", "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens"})
NEUTRAL_SAMPLING: dict[str, Any] = {
    "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0,
    "no_stop_trim": False, "logit_bias": {}, "stop_regex": None, "json_schema": None, "regex": None, "ebnf": None,
    "structural_tag": None, "stream_interval": None, "custom_params": None, "beam_width": None, "watermark": None}
SGLANG_TOP_K_ALL = 1 << 30  # sglang SamplingParams TOP_K_ALL


class HTTPError(Exception):
    """An error answered to the client as ``{"error": {"message": ...}}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------------------
# Request models (io_struct.py)
# --------------------------------------------------------------------------------------------------------------

class GenerateReqInput(BaseModel):
    """``/generate``. One of ``input_ids`` / ``text``; a single prompt answers one object, a batch a list."""

    text: str | list[str] | None = None
    input_ids: Any = None
    """A non-empty list of ints, or a list of such lists (SGLang: ``validate_optional_list_i64_1d_2d``)."""
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    """-1 (default): no prompt log-probs; 0: every prompt token's (see ``PromptLogprobs``); others: 400."""
    top_logprobs_num: int | list[int] | None = None
    """K > 0 with ``logprob_start_len=0``: the top-K log-probs at every prompt position (``input_top_logprobs``)."""
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    """MoE models: ``meta_info.routed_experts``, the top-k expert ids of every fed token and layer (see
    ``routed_experts_b64``); 400 for a dense model (SGLang returns nothing there)."""
    routed_experts_start_len: int = 0
    """The routing starts at this prompt position (SGLang: ``[start_len, seqlen - 1)``, 0 <= start_len <= prompt)."""
    stream: bool = False
    """SGLang streams server-sent events; the embedded engine answers 400 to ``stream=true``."""
    rid: str | list[str] | None = None

    @field_validator("input_ids", mode="plain")
    @classmethod
    def _ids(cls, value: Any) -> list[int] | list[list[int]] | None:
        def is_id(t: Any) -> bool:
            return isinstance(t, int) and not isinstance(t, bool)

        if value is None or (isinstance(value, list) and value and all(is_id(t) for t in value)):
            return value
        if isinstance(value, list) and value and all(isinstance(p, list) and all(is_id(t) for t in p)
                                                     for p in value):
            return value
        raise ValueError("input_ids must be a non-empty list of ints or a list of such lists")

    @field_validator("sampling_params", mode="plain")
    @classmethod
    def _sampling(cls, value: Any) -> dict[str, Any] | list[dict[str, Any]] | None:
        if value is None or isinstance(value, dict) or (isinstance(value, list)
                                                        and all(isinstance(p, dict) for p in value)):
            return value
        raise ValueError("sampling_params must be an object, or a list of objects (one per prompt)")

    @field_validator("text", mode="plain")
    @classmethod
    def _text(cls, value: Any) -> str | list[str] | None:
        if value is None or isinstance(value, str) or (isinstance(value, list)
                                                       and all(isinstance(t, str) for t in value)):
            return value
        raise ValueError("text must be a string or a list of strings")


class BaseReq(BaseModel):
    """Fields every single-request SGLang input carries (``io_struct.BaseReq``)."""

    rid: str | None = None


class UpdateWeightFromDiskReqInput(BaseReq):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | int | None = None
    """SGLang: a string; an integer is accepted as well (versions are integers here, sent as strings)."""
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True


class UpdateWeightsFromTensorReqInput(BaseReq):
    serialized_named_tensors: list[str] = []
    """Base64 payloads (SGLang requires the field; the embedded engine refuses every tensor update anyway)."""
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | int | None = None
    selector: str = "all"
    torch_empty_cache: bool = False


class InitWeightsUpdateGroupReqInput(BaseReq):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedReqInput(BaseReq):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | int | None = None
    load_format: str | None = None
    """Only the default (one tensor per name) is supported by the embedded engine."""
    selector: str = "all"
    torch_empty_cache: bool = False


class DestroyWeightsUpdateGroupReqInput(BaseReq):
    group_name: str = "weight_update_group"


class GetWeightsByNameReqInput(BaseReq):
    name: str
    truncate_size: int = 100


class PauseGenerationReqInput(BaseReq):
    mode: str = "abort"
    """abort | retract | in_place (SGLang: a Literal; the engine names a bad value in its 400 message)."""


class ContinueGenerationReqInput(BaseReq):
    torch_empty_cache: bool = True


class ReleaseMemoryOccupationReqInput(BaseReq):
    tags: list[str] | None = None


class ResumeMemoryOccupationReqInput(BaseReq):
    tags: list[str] | None = None


def parse_version(raw: str | int | None) -> int:
    """The integer weight version of a request; a bucket of a multi-bucket update carries a "-partial" suffix."""
    if isinstance(raw, str) and raw.endswith(PARTIAL_VERSION_SUFFIX):
        raw = raw[: -len(PARTIAL_VERSION_SUFFIX)]  # staged until complete, see weights.StagedUpdate
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HTTPError(400, f"weight_version must be an integer string (versions strictly increase), "
                             f"got {raw!r}") from None


# --------------------------------------------------------------------------------------------------------------
# Sampling parameters and responses (pure functions: unit-testable, and the wire test checks their output)
# --------------------------------------------------------------------------------------------------------------

def parse_sampling_params(raw: dict | None, max_n: int | None = None) -> SamplingParams:
    """SGLang's sampling_params dict -> SamplingParams; HTTPError(400) naming the first unsupported key, value
    of the wrong JSON type (a string ``max_new_tokens``, a list ``temperature``), out-of-range value, or an ``n``
    above ``max_n``. A missing or null key takes SGLang's default; nothing is coerced (``"false"`` is no bool).
    """
    raw = dict(raw or {})
    for key, value in raw.items():
        if key in SUPPORTED_SAMPLING:
            continue
        if key in NEUTRAL_SAMPLING:
            if value is not None and value != NEUTRAL_SAMPLING[key]:
                raise HTTPError(400, f"sampling_params.{key}={show(value)} is not supported by the embedded engine")
            continue
        raise HTTPError(400, f"unknown sampling_params key {show(key)}")
    n = _integer(raw, "n", 1, low=1)
    if max_n is not None and n > max_n:
        raise HTTPError(400, f"sampling_params.n={n} exceeds this server's limit of {max_n} samples per prompt "
                             "(serve-rollout --max-n)")
    top_k = _integer(raw, "top_k", -1, low=-1)
    stop = raw.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise HTTPError(400, f"sampling_params.stop must be a string or a list of strings, got {show(stop)}")
    stop_ids = raw.get("stop_token_ids")
    if stop_ids is None:
        stop_ids = ()
    elif not (isinstance(stop_ids, list) and all(_is_int(t) and t >= 0 for t in stop_ids)):
        raise HTTPError(400, f"sampling_params.stop_token_ids must be a list of token ids (ints >= 0), got "
                             f"{show(stop_ids)}")
    seed = raw.get("sampling_seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        raise HTTPError(400, f"sampling_params.sampling_seed must be an integer in [0, 2**63), got {show(seed)}")
    _flag(raw, "spaces_between_special_tokens", True)  # accepted (byte-level detokenising ignores it), but typed
    try:
        return SamplingParams(
            n=n,
            max_new_tokens=_integer(raw, "max_new_tokens", 128, low=1),
            temperature=_number(raw, "temperature", 1.0),
            top_p=_number(raw, "top_p", 1.0),
            top_k=-1 if top_k == SGLANG_TOP_K_ALL else top_k,
            stop=tuple(stop),
            stop_token_ids=tuple(stop_ids),
            ignore_eos=_flag(raw, "ignore_eos", False),
            seed=seed,
            skip_special_tokens=_flag(raw, "skip_special_tokens", True),
        )
    except (TypeError, ValueError, UserError) as exc:  # SamplingParams' range checks name the field
        raise HTTPError(400, f"invalid sampling_params: {str(exc).replace('SamplingParams.', 'sampling_params.')}") \
            from None


def show(value: Any) -> str:
    """``repr(value)`` cut to a readable length: an error message must not echo a megabyte of the body."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 6


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(raw: dict, key: str, default: int, low: int) -> int:
    value = raw.get(key)
    if value is None:
        return default
    if not _is_int(value):
        raise HTTPError(400, f"sampling_params.{key} must be an integer, got {show(value)}")
    if value < low:
        raise HTTPError(400, f"sampling_params.{key} must be >= {low}, got {value}")
    return value


def _number(raw: dict, key: str, default: float) -> float:
    value = raw.get(key)
    if value is None:
        return default
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise HTTPError(400, f"sampling_params.{key} must be a finite number, got {show(value)}")
    return float(value)


def _flag(raw: dict, key: str, default: bool) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HTTPError(400, f"sampling_params.{key} must be true or false, got {show(value)}")
    return value


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


def logprob_request(req: GenerateReqInput) -> tuple[bool, int]:
    """(whether prompt log-probs are asked for, top-K per position) of a /generate request; 400 for what the
    embedded engine does not serve (a ``logprob_start_len`` other than -1 or 0, per-prompt values that differ)."""
    def one(value: int | list[int] | None, name: str, default: int) -> int:
        values = set(value) if isinstance(value, list) else {value}
        if not values:
            raise HTTPError(400, f"{name} must be an integer or a list of one per prompt, got []")
        if len(values) > 1:
            raise HTTPError(400, f"{name} must be the same for every prompt in the embedded engine, got {value}")
        v = values.pop()
        return default if v is None else int(v)

    start = one(req.logprob_start_len, "logprob_start_len", -1)
    if start not in (-1, 0):
        raise HTTPError(400, f"logprob_start_len={start} is not supported by the embedded engine (only -1 or 0)")
    top_k = one(req.top_logprobs_num, "top_logprobs_num", 0)
    if top_k < 0:
        raise HTTPError(400, f"top_logprobs_num must be >= 0, got {top_k}")
    return_logprob = any(req.return_logprob) if isinstance(req.return_logprob, list) else bool(req.return_logprob)
    return return_logprob and start == 0, top_k


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
