"""SGLang's native wire format: the request bodies we send and the /generate response we read. Pure functions.

Request bodies are built field for field from the pinned SGLang release (``sglang/srt/managers/io_struct.py``:
``GenerateReqInput``, ``UpdateWeightFromDiskReqInput``, ``UpdateWeightsFromTensorReqInput``,
``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``, ...; sampling keys from
``sglang/srt/sampling/sampling_params.py``). ``tests/unit/test_rollout_sglang_wire.py`` checks every key the
client sends against that source, so an upstream rename fails CI, not a run.

Weight versions travel as strings (SGLang's ``weight_version``); ours are integers. A partially transferred
update is tagged ``"<v>-partial"`` (updater.py) so that samples generated from it parse to version -1 and are
never trained on.
"""
from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_pz.rollout.http_transport import BadResponse
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams


def parse_weight_version(raw: Any) -> int:
    """SGLang's weight_version string -> int; -1 for "default", a partial-update tag or anything else."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw)
    return -1


# --------------------------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------------------------

def sampling_params_payload(params: SamplingParams) -> dict:
    """``sampling_params`` of a /generate body (keys of sglang/srt/sampling/sampling_params.py)."""
    out: dict[str, Any] = {
        "n": params.n,
        "max_new_tokens": params.max_new_tokens,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": params.top_k,
        "skip_special_tokens": params.skip_special_tokens,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.ignore_eos:
        out["ignore_eos"] = True
    if params.seed is not None:
        # SGLang honours sampling_seed only with the pytorch sampling backend / deterministic inference.
        out["sampling_seed"] = int(params.seed)
    return out


def generate_payload(prompts: Sequence[Sequence[int]], params: SamplingParams,
                     return_text_in_logprobs: bool = False, return_routed_experts: bool = False) -> dict:
    """/generate body (GenerateReqInput). Always a batch, so the response is always a list.

    ``return_routed_experts``: MoE routing replay; the server must run with ``--enable-return-routed-experts``."""
    out: dict[str, Any] = {
        "input_ids": [list(map(int, p)) for p in prompts],
        "sampling_params": sampling_params_payload(params),
        "return_logprob": True,
        "return_text_in_logprobs": return_text_in_logprobs,
        "stream": False,
    }
    if return_routed_experts:
        out["return_routed_experts"] = True  # from the first prompt token (routed_experts_start_len 0)
    return out


def input_logprobs_payload(prompts: Sequence[Sequence[int]], top_k: int) -> dict:
    """/generate body asking for the prompts' own top-``top_k`` log-probs at every position (``logprob_start_len``
    0) and one throw-away output token (SGLang needs ``max_new_tokens >= 1``)."""
    return {
        "input_ids": [list(map(int, p)) for p in prompts],
        "sampling_params": sampling_params_payload(SamplingParams(n=1, max_new_tokens=1, temperature=1.0)),
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": int(top_k),
        "return_text_in_logprobs": False,
        "stream": False,
    }


def update_weights_from_disk_payload(model_path: str, version: int, flush_cache: bool = True,
                                     abort_all_requests: bool = False) -> dict:
    """/update_weights_from_disk body (UpdateWeightFromDiskReqInput)."""
    return {"model_path": str(model_path), "weight_version": str(version), "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests}


def update_weights_from_tensor_payload(serialized_named_tensors: list[str], version: int | str,
                                       load_format: str | None = "flattened_bucket",
                                       flush_cache: bool = False) -> dict:
    """/update_weights_from_tensor body (UpdateWeightsFromTensorReqInput); payloads are base64 strings."""
    out: dict[str, Any] = {"serialized_named_tensors": list(serialized_named_tensors),
                           "weight_version": str(version), "flush_cache": flush_cache}
    if load_format is not None:
        out["load_format"] = load_format
    return out


def init_weights_update_group_payload(master_address: str, master_port: int, rank_offset: int, world_size: int,
                                      group_name: str = "weight_update_group", backend: str = "nccl") -> dict:
    """/init_weights_update_group body (InitWeightsUpdateGroupReqInput)."""
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def update_weights_from_distributed_payload(names: list[str], dtypes: list[str], shapes: list[list[int]],
                                            version: int | str, group_name: str = "weight_update_group",
                                            flush_cache: bool = False) -> dict:
    """/update_weights_from_distributed body (UpdateWeightsFromDistributedReqInput)."""
    return {"names": list(names), "dtypes": list(dtypes), "shapes": [list(map(int, s)) for s in shapes],
            "group_name": group_name, "weight_version": str(version), "flush_cache": flush_cache}


def destroy_weights_update_group_payload(group_name: str = "weight_update_group") -> dict:
    """/destroy_weights_update_group body (DestroyWeightsUpdateGroupReqInput)."""
    return {"group_name": group_name}


def get_weights_by_name_payload(name: str, truncate_size: int = 100) -> dict:
    """/get_weights_by_name body (GetWeightsByNameReqInput)."""
    return {"name": name, "truncate_size": int(truncate_size)}


def pause_generation_payload(mode: str = "abort") -> dict:
    """/pause_generation body (PauseGenerationReqInput)."""
    return {"mode": mode}


def continue_generation_payload() -> dict:
    """/continue_generation body (ContinueGenerationReqInput)."""
    return {}


def memory_occupation_payload(tags: list[str] | None = None) -> dict:
    """/release_memory_occupation and /resume_memory_occupation body (ReleaseMemoryOccupationReqInput, ...)."""
    return {} if tags is None else {"tags": list(tags)}


# --------------------------------------------------------------------------------------------------------------
# Response parsing
# --------------------------------------------------------------------------------------------------------------

def parse_generate_response(data: Any, prompts: Sequence[Sequence[int]], params: SamplingParams,
                            where: str) -> list[list[GenerationResult]]:
    """SGLang /generate JSON (prompt-major list, n per prompt) -> results; BadResponse naming ``where``."""
    expected = len(prompts) * params.n
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or len(data) != expected:
        got = f"a list of {len(data)}" if isinstance(data, list) else type(data).__name__
        raise BadResponse(f"{where}: expected a list of {expected} outputs ({len(prompts)} prompts x n={params.n}), "
                          f"got {got}")
    results: list[list[GenerationResult]] = [[] for _ in prompts]
    for k, item in enumerate(data):
        try:
            results[k // params.n].append(_parse_item(item, k // params.n, len(prompts[k // params.n])))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BadResponse(f"{where}: output {k} is malformed ({type(exc).__name__}: {exc}): "
                              f"{str(item)[:200]}") from None
    return results


def parse_routed_experts(raw: str, prompt_len: int, response_len: int) -> np.ndarray:
    """SGLang's ``meta_info.routed_experts`` (base64 int32, from prompt position 0) -> ``(P + R - 1, L * K)``
    int32: one row per fed token, each layer's top-k expert ids (layer-major). ValueError when the size is not
    a whole number of rows."""
    flat = np.frombuffer(base64.b64decode(raw), dtype=np.int32)
    rows = prompt_len + response_len - 1
    if rows <= 0 or flat.size % rows or flat.size == 0:
        raise ValueError(f"routed_experts holds {flat.size} ids, not a whole number of rows for {rows} fed tokens "
                         f"(prompt {prompt_len} + response {response_len} - 1)")
    return flat.reshape(rows, -1)


def _parse_item(item: dict, prompt_index: int, prompt_len: int = 0) -> GenerationResult:
    meta = item["meta_info"]
    output_ids = [int(t) for t in item["output_ids"]]
    entries = meta["output_token_logprobs"]
    if len(entries) != len(output_ids):
        raise ValueError(f"{len(entries)} output_token_logprobs for {len(output_ids)} output_ids")
    logprobs = []
    for (lp, tok, *_), want in zip(entries, output_ids):
        if int(tok) != want:
            raise ValueError(f"logprob entry for token {tok} where output_ids has {want}")
        logprobs.append(float(lp))
    reason = meta["finish_reason"] or {}
    kind = reason.get("type")
    if kind not in ("stop", "length", "abort"):
        raise ValueError(f"unknown finish_reason {reason!r}")
    spans = meta.get("weight_versions") or []
    first_version = spans[0]["version"] if spans else meta.get("weight_version")
    routed = meta.get("routed_experts")
    return GenerationResult(
        routed_experts=None if routed is None else parse_routed_experts(routed, prompt_len, len(output_ids)),
        prompt_index=prompt_index, response_ids=output_ids, logprobs=logprobs, finish_reason=kind,
        weight_version=parse_weight_version(first_version), text=item.get("text"),
        matched_stop=reason.get("matched") if kind == "stop" else None, mixed_versions=len(spans) > 1,
        extra={"e2e_latency": meta.get("e2e_latency")},
    )


def parse_input_top_logprobs(data: Any, prompts: Sequence[Sequence[int]], where: str) -> list[list[list[float]]]:
    """The ``input_top_logprobs`` of a response to ``input_logprobs_payload``: per prompt, one row per input
    token, ``[[logprob, token_id, text], ...]`` (None for the first token, as SGLang's
    ``SchedulerLogprobResultProcessor._process_input_top_logprobs`` lays it out) -> log-probs, descending."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or len(data) != len(prompts):
        got = f"a list of {len(data)}" if isinstance(data, list) else type(data).__name__
        raise BadResponse(f"{where}: expected a list of {len(prompts)} outputs, got {got}")
    out: list[list[list[float]]] = []
    for k, (item, prompt) in enumerate(zip(data, prompts)):
        try:
            rows = item["meta_info"]["input_top_logprobs"]
            if len(rows) != len(prompt):
                raise ValueError(f"{len(rows)} input_top_logprobs rows for a prompt of {len(prompt)} tokens")
            out.append([sorted((float(e[0]) for e in row or []), reverse=True) for row in rows])
            out[-1][0] = []
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BadResponse(f"{where}: output {k} has no usable input_top_logprobs ({type(exc).__name__}: "
                              f"{exc}): {str(item)[:200]}") from None
    return out
