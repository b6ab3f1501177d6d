"""The weight-update side of a rollout backend: the endpoints the weight-sync strategies call.

Generation (``RolloutEngine`` in protocol.py) is what the trainer and eval call every step; this protocol is
what ``megatron_pz.weight_sync`` calls to bring the engines to the trainer's weights. Implemented by
``SGLangClient`` (one server), ``RolloutPool`` (fan-out to every server) and ``EmbeddedEngine`` (in-process).
Each method mirrors one SGLang endpoint of the same name (``sglang/srt/entrypoints/http_server.py``).

Weight versions strictly increase; an engine refuses a version <= its current one. SGLang loads each bucket as it
arrives, so a multi-bucket transfer tags every bucket but the last ``"<v>-partial"``
(``PARTIAL_VERSION_SUFFIX``): if the transfer dies midway the engine reports a non-integer version, its samples
parse to version -1 and are never trained on. Methods raise ``megatron_pz.errors.RolloutError`` (naming the
server/endpoint) on failure.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

PARTIAL_VERSION_SUFFIX = "-partial"


@runtime_checkable
class WeightUpdater(Protocol):
    """Weight-update and memory endpoints of a rollout backend (see the module docstring)."""

    def update_weights_from_disk(self, model_path: str, version: int) -> None:
        """Load a full HF safetensors folder and switch to ``version`` (all or nothing)."""
        ...

    def update_weights_from_tensor(
        self, serialized_named_tensors: list[str], version: int | str, load_format: str | None = "flattened_bucket"
    ) -> None:
        """One bucket of CUDA-IPC-serialized tensors (one payload per engine TP rank); colocated GPUs only."""
        ...

    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = "weight_update_group", backend: str = "nccl",
    ) -> None:
        """Join the trainer's broadcast group (the trainer is rank 0). Blocks until the group forms."""
        ...

    def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], version: int | str,
        group_name: str = "weight_update_group",
    ) -> None:
        """Receive one bucket broadcast by rank 0 of the group, in ``names`` order. Blocks until received."""
        ...

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None: ...

    def flush_cache(self) -> None:
        """Drop the prefix/KV cache (stale after a weight update)."""
        ...

    def pause_generation(self, mode: str = "abort") -> None:
        """Stop scheduling; "abort" returns in-flight requests with finish reason "abort"."""
        ...

    def continue_generation(self) -> None: ...

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free GPU memory (weights and/or KV cache) for a colocated trainer step."""
        ...

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None: ...
