"""Client for ONE server speaking SGLang's native API (a real SGLang server or our embedded one).

``SGLangClient`` implements both rollout protocols: ``RolloutEngine`` (generate, weight_version, health, close;
protocol.py) and ``WeightUpdater`` (the weight-update endpoints; updater.py). Each method is one endpoint: the
body comes from sglang_wire.py, the call goes through ``request`` (http_transport.py: retries, timeouts, errors
naming the server URL and endpoint), and what a retry may do depends on the endpoint (weight updates are retried
only where that cannot apply them twice).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import requests

from megatron_pz.errors import RolloutError
from megatron_pz.rollout.http_transport import BadResponse, ClientConfig, HttpTransport, ServerUnavailable
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams
from megatron_pz.rollout.sglang_wire import (
    continue_generation_payload,
    destroy_weights_update_group_payload,
    generate_payload,
    get_weights_by_name_payload,
    init_weights_update_group_payload,
    input_logprobs_payload,
    memory_occupation_payload,
    parse_generate_response,
    parse_weight_version,
    parse_input_top_logprobs,
    pause_generation_payload,
    update_weights_from_disk_payload,
    update_weights_from_distributed_payload,
    update_weights_from_tensor_payload,
)

logger = logging.getLogger(__name__)


class SGLangClient:
    """One server. Thread-safe for concurrent requests (the transport's session keeps a keep-alive pool)."""

    def __init__(self, base_url: str, config: ClientConfig | None = None, session: requests.Session | None = None):
        self.transport = HttpTransport(base_url, config, session)
        self.base_url = self.transport.base_url
        self.config = self.transport.config

    def __repr__(self) -> str:
        return f"SGLangClient({self.base_url})"

    def request(self, method: str, endpoint: str, payload: dict | None = None, *, timeout_s: float,
                retries: int | None = None, expect_json: bool = True) -> Any:
        """Every endpoint call goes through here (HttpTransport.request: retries, timeouts, error mapping)."""
        return self.transport.request(method, endpoint, payload, timeout_s=timeout_s, retries=retries,
                                      expect_json=expect_json)

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
        data = self.request("POST", "/generate",
                            generate_payload(prompts, params, return_routed_experts=self.config.return_routed_experts),
                            timeout_s=self.config.generate_timeout_s)
        results = parse_generate_response(data, prompts, params, where=f"POST {self.base_url}/generate")
        for group in results:
            for r in group:
                r.server = self.base_url
        return results

    def input_top_logprobs(self, prompts: Sequence[Sequence[int]], top_k: int) -> list[list[list[float]]]:
        if not prompts:
            return []
        data = self.request("POST", "/generate", input_logprobs_payload(prompts, top_k),
                            timeout_s=self.config.generate_timeout_s)
        return parse_input_top_logprobs(data, prompts, where=f"POST {self.base_url}/generate")

    def health(self) -> bool:
        return self.transport.probe("/health_generate", read_timeout_s=30.0)

    def model_info(self) -> dict:
        data = self.request("GET", "/get_model_info", timeout_s=30.0)
        if not isinstance(data, dict):
            raise BadResponse(f"GET {self.base_url}/get_model_info: expected an object, got {data!r}"[:300])
        return data

    def weight_version(self) -> int:
        return parse_weight_version(self.model_info().get("weight_version"))

    def close(self) -> None:
        """Close the keep-alive connections (the server keeps running)."""
        self.transport.close()

    # ---------------------------------------------------------------- WeightUpdater

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
                time.sleep(self.config.backoff(attempt + 1))
                try:
                    if self.weight_version() == version:
                        return
                except RolloutError:
                    pass
