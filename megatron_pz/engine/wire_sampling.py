"""SGLang's ``sampling_params`` (``sglang/srt/sampling/sampling_params.py``) parsed into ``SamplingParams``: the keys
the embedded engine honours, those it accepts at their neutral value only, and a 400 naming anything else (as
SGLang's JSON contract gate rejects unknown keys, ``sglang/api/v1/api_types.py``)."""
from __future__ import annotations

import math
from typing import Any

from megatron_pz.engine.wire_requests import HTTPError, show
from megatron_pz.errors import UserError
from megatron_pz.rollout.protocol import SamplingParams

# SGLang sampling keys we honour, and those we accept only at their neutral value (anything else: 400).
SUPPORTED_SAMPLING = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids",
                                "ignore_eos", "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens"})
NEUTRAL_SAMPLING: dict[str, Any] = {
    "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0,
    "no_stop_trim": False, "logit_bias": {}, "stop_regex": None, "json_schema": None, "regex": None, "ebnf": None,
    "structural_tag": None, "stream_interval": None, "custom_params": None, "beam_width": None, "watermark": None}
SGLANG_TOP_K_ALL = 1 << 30  # sglang SamplingParams TOP_K_ALL


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
