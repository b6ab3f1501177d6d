"""HTTP client for ONE server speaking SGLang's native API (a real SGLang server or our embedded one).

Wire format: request bodies are built by the ``*_payload`` functions below, field for field from the pinned
SGLang release (``sglang/srt/managers/io_struct.py``: ``GenerateReqInput``, ``UpdateWeightFromDiskReqInput``,
``UpdateWeightsFromTensorReqInput``, ``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``,
...; sampling keys from ``sglang/srt/sampling/sampling_params.py``). ``tests/unit/test_rollout_sglang_wire.py``
checks every key these functions emit against that source, so an upstream rename fails CI, not a run.

Failure policy:
  * connection refused/reset, a server closing the connection mid-request, timeouts, HTTP 429/5xx: retried with
    exponential backoff and jitter, bounded in attempts and total time, then ``ServerUnavailable``;
  * other HTTP 4xx, or a 2xx body that is not the JSON we expect: ``BadResponse`` at once (retrying cannot help).
Both are ``RolloutError`` and name the server URL and endpoint.

Weight versions travel as strings (SGLang's ``weight_version``); ours are integers. A partially transferred
update is tagged ``"<v>-partial"`` so that samples generated from it parse to version -1 and are never trained on.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import requests

from megatron_pz.errors import RolloutError
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams

logger = logging.getLogger(__name__)

_RETRY_STATUS = {429, 500, 502, 503, 504}
PARTIAL_VERSION_SUFFIX = "-partial"


class ServerUnavailable(RolloutError):
    """The server could not be reached, timed out or answered 5xx, after retries. Another server may work."""


class BadResponse(RolloutError):
    """The server answered 4xx or something that is not the expected JSON. Not retried."""


def parse_weight_version(raw: Any) -> int:
    """SGLang's weight_version string -> int; -1 for "default", a partial-update tag or anything else."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw)
    return -1


@dataclass
class ClientConfig:
    """Timeouts and retry policy of one server connection."""

    api_key: str | None = None
    """Sent as ``Authorization: Bearer <key>`` (SGLang's ``--api-key``)."""
    connect_timeout_s: float = 5.0
    generate_timeout_s: float = 900.0
    """Read timeout of one /generate call: long rollouts are slow."""
    control_timeout_s: float = 900.0
    """Read timeout of weight updates and other control calls (a disk update reads the whole model)."""
    max_retries: int = 3
    """Retries after the first attempt, for retryable failures only."""
    backoff_s: float = 0.5
    """First backoff; doubles per retry, with jitter in [50%, 100%]."""
    backoff_max_s: float = 8.0
    max_total_s: float = 1800.0
    """No new attempt starts after this many seconds since the first one."""


# --------------------------------------------------------------------------------------------------------------
# Request bodies (pure; the wire test calls these)
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
                     return_text_in_logprobs: bool = False) -> dict:
    """/generate body (GenerateReqInput). Always a batch, so the response is always a list."""
    return {
        "input_ids": [list(map(int, p)) for p in prompts],
        "sampling_params": sampling_params_payload(params),
        "return_logprob": True,
        "return_text_in_logprobs": return_text_in_logprobs,
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
            results[k // params.n].append(_parse_item(item, k // params.n))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BadResponse(f"{where}: output {k} is malformed ({type(exc).__name__}: {exc}): "
                              f"{str(item)[:200]}") from None
    return results


def _parse_item(item: dict, prompt_index: int) -> GenerationResult:
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
    return GenerationResult(
        prompt_index=prompt_index, response_ids=output_ids, logprobs=logprobs, finish_reason=kind,
        weight_version=parse_weight_version(first_version), text=item.get("text"),
        matched_stop=reason.get("matched") if kind == "stop" else None, mixed_versions=len(spans) > 1,
        extra={"e2e_latency": meta.get("e2e_latency")},
    )


# --------------------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------------------

class SGLangClient:
    """One server. Thread-safe for concurrent requests (requests.Session keeps a keep-alive pool)."""

    def __init__(self, base_url: str, config: ClientConfig | None = None, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.config = config or ClientConfig()
        self.session = session or requests.Session()
        # A pool big enough for the pool's per-server concurrency: requests' default of 10 would serialise.
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=256, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if self.config.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.config.api_key}"

    def __repr__(self) -> str:
        return f"SGLangClient({self.base_url})"

    # ---------------------------------------------------------------- transport

    def request(self, method: str, endpoint: str, payload: dict | None = None, *, timeout_s: float,
                retries: int | None = None, expect_json: bool = True) -> Any:
        """One call with the retry policy of the module docstring; returns parsed JSON (or text)."""
        url = self.base_url + endpoint
        retries = self.config.max_retries if retries is None else retries
        start = time.monotonic()
        last: Exception | None = None
        for attempt in range(retries + 1):
            if attempt:
                delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)  # jitter: servers restarted together are not hit in lockstep
                if time.monotonic() - start + delay > self.config.max_total_s:
                    break
                logger.warning("%s %s: %s; retry %d/%d in %.2fs", method, url, last, attempt, retries, delay)
                time.sleep(delay)
            try:
                resp = self.session.request(method, url, json=payload,
                                            timeout=(self.config.connect_timeout_s, timeout_s))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                # Refused connection, a server dying mid-request (RemoteDisconnected) or mid-body, a timeout.
                last = exc
                continue
            if resp.status_code in _RETRY_STATUS:
                last = ServerUnavailable(f"HTTP {resp.status_code}: {resp.text[:200]!r}")
                continue
            if resp.status_code >= 400:
                raise BadResponse(f"{method} {url} -> HTTP {resp.status_code}: {_error_text(resp)}")
            if not expect_json:
                return resp.text
            try:
                return resp.json()
            except ValueError:
                raise BadResponse(f"{method} {url} -> HTTP {resp.status_code} with a body that is not JSON: "
                                  f"{resp.text[:200]!r}") from None
        raise ServerUnavailable(f"{method} {url}: unreachable after {attempt + 1} attempt(s) over "
                                f"{time.monotonic() - start:.1f}s: {type(last).__name__}: {last}")

    def _control(self, endpoint: str, payload: dict, retries: int | None = None) -> dict:
        """POST a weight/control call answered with SGLang's {"success": bool, "message": str}."""
        data = self.request("POST", endpoint, payload, timeout_s=self.config.control_timeout_s, retries=retries)
        if not isinstance(data, dict) or data.get("success") is not True:
            raise BadResponse(f"POST {self.base_url}{endpoint} failed: {data!r}"[:500])
        return data

    # ---------------------------------------------------------------- RolloutEngine

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        if not prompts:
            return []
        data = self.request("POST", "/generate", generate_payload(prompts, params),
                            timeout_s=self.config.generate_timeout_s)
        results = parse_generate_response(data, prompts, params, where=f"POST {self.base_url}/generate")
        for group in results:
            for r in group:
                r.server = self.base_url
        return results

    def health(self) -> bool:
        try:
            resp = self.session.get(self.base_url + "/health_generate",
                                    timeout=(self.config.connect_timeout_s, 30.0))
        except requests.RequestException:
            return False
        return resp.status_code == 200

    def model_info(self) -> dict:
        data = self.request("GET", "/get_model_info", timeout_s=30.0)
        if not isinstance(data, dict):
            raise BadResponse(f"GET {self.base_url}/get_model_info: expected an object, got {data!r}"[:300])
        return data

    def weight_version(self) -> int:
        return parse_weight_version(self.model_info().get("weight_version"))

    def update_weights_from_disk(self, model_path: str, version: int) -> None:
        self._versioned_update("/update_weights_from_disk", update_weights_from_disk_payload(model_path, version),
                               version)

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], version: int | str,
                                   load_format: str | None = "flattened_bucket") -> None:
        # Not retried: a CUDA-IPC bucket may only be consumed once (slime: fresh buffers per bucket).
        self._control("/update_weights_from_tensor",
                      update_weights_from_tensor_payload(serialized_named_tensors, version, load_format), retries=0)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> None:
        self._control("/init_weights_update_group", init_weights_update_group_payload(
            master_address, master_port, rank_offset, world_size, group_name, backend), retries=0)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        version: int | str, group_name: str = "weight_update_group") -> None:
        # Never retried: the server must take part in exactly one broadcast per request.
        self._control("/update_weights_from_distributed", update_weights_from_distributed_payload(
            names, dtypes, shapes, version, group_name), retries=0)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self._control("/destroy_weights_update_group", destroy_weights_update_group_payload(group_name), retries=0)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        data = self.request("POST", "/get_weights_by_name", get_weights_by_name_payload(name, truncate_size),
                            timeout_s=self.config.control_timeout_s)
        if not isinstance(data, list):
            raise BadResponse(f"POST {self.base_url}/get_weights_by_name: expected a list, got {str(data)[:200]}")
        return data

    def flush_cache(self, timeout_s: float = 60.0) -> None:
        """Flush the radix cache. SGLang answers 400 while requests are still running or draining (after a
        pause, aborted requests take a moment to leave), so poll until it succeeds, as slime's engine does."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.request("POST", "/flush_cache", None, timeout_s=self.config.control_timeout_s,
                             expect_json=False)
                return
            except BadResponse as exc:
                if "HTTP 400" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def pause_generation(self, mode: str = "abort") -> None:
        self.request("POST", "/pause_generation", pause_generation_payload(mode),
                     timeout_s=self.config.control_timeout_s)

    def continue_generation(self) -> None:
        self.request("POST", "/continue_generation", continue_generation_payload(),
                     timeout_s=self.config.control_timeout_s)

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.request("POST", "/release_memory_occupation", memory_occupation_payload(tags),
                     timeout_s=self.config.control_timeout_s)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.request("POST", "/resume_memory_occupation", memory_occupation_payload(tags),
                     timeout_s=self.config.control_timeout_s)

    # ---------------------------------------------------------------- helpers

    def _versioned_update(self, endpoint: str, payload: dict, version: int) -> None:
        """A weight update that is safe to retry: before re-sending, ask whether the last attempt landed."""
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            try:
                self._control(endpoint, payload, retries=0)
                return
            except ServerUnavailable as exc:
                if attempt == attempts - 1:
                    raise
                logger.warning("%s%s: %s; checking whether version %d landed", self.base_url, endpoint, exc, version)
                time.sleep(min(self.config.backoff_max_s, self.config.backoff_s * 2 ** attempt))
                try:
                    if self.weight_version() == version:
                        return
                except RolloutError:
                    pass


def _error_text(resp: requests.Response) -> str:
    """The message of an SGLang error body ({"error": {"message"}} / {"message"} / {"detail"}) or raw text."""
    try:
        body = resp.json()
    except ValueError:
        return repr(resp.text[:300])
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if key in body:
                return str(body[key])
    return repr(str(body)[:300])
