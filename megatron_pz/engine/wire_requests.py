"""SGLang's request side: the pydantic request models (``sglang/srt/managers/io_struct.py``), the error a request
is refused with, and the checks of a ``/generate`` request's version and log-prob fields. The wire format as a
whole, and why it mirrors SGLang: ``engine/wire.py``; sampling parameters: ``wire_sampling.py``; the response
items: ``wire_responses.py``.
"""
from __future__ import annotations

import reprlib
from typing import Any

from pydantic import BaseModel, field_validator

from megatron_pz.rollout.updater import PARTIAL_VERSION_SUFFIX


class HTTPError(Exception):
    """An error answered to the client as ``{"error": {"message": ...}}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def show(value: Any) -> str:
    """``repr(value)`` cut to a readable length: an error message must not echo a megabyte of the body."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 6


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


# --------------------------------------------------------------------------------------------------------------
# Request checks
# --------------------------------------------------------------------------------------------------------------

def parse_version(raw: str | int | None) -> int:
    """The integer weight version of a request; a bucket of a multi-bucket update carries a "-partial" suffix."""
    if isinstance(raw, str) and raw.endswith(PARTIAL_VERSION_SUFFIX):
        raw = raw[: -len(PARTIAL_VERSION_SUFFIX)]  # staged until complete, see weights.StagedUpdate
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HTTPError(400, f"weight_version must be an integer string (versions strictly increase), "
                             f"got {raw!r}") from None


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
