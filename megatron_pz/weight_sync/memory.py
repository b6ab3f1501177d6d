"""In-memory weight sync: the colocated engine of a model-parallel run takes rank 0's gathered tensors by copy.

With ``rollout.colocate=true`` at world size > 1 (TP, PP, DP) no rank holds the whole model in Megatron's layout,
so the engine on global rank 0 keeps its own full HF copy (``trainer/colocate.py``). A push is what the disk sync
does without the disk: the publisher has already gathered the HF tensors on rank 0 (collective); the engine
validates them against its model (names, shapes, finiteness) outside its generation lock and copies them into its
parameters in place under it (``EmbeddedEngine.swap_weights``), then the version moves. No file, no HTTP update,
no second process.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Protocol

import torch

from megatron_pz.weight_sync.base import NamedTensors, SyncReport, VersionedSync
from megatron_pz.weight_sync.shared import VersionListener

logger = logging.getLogger(__name__)


class StateSwapper(Protocol):
    """An engine that validates a complete state and copies it in under its lock (``EmbeddedEngine.swap_weights``)."""

    def swap_weights(self, tensors: Mapping[str, torch.Tensor], version: int, source: str) -> None: ...


class InMemoryWeightSync(VersionedSync):
    """Copy rank 0's gathered HF tensors into the colocated engine's own parameters as one new version.

    ``pool``: the data owner's pool on rank 0, told of the version (the other ranks' pools learn it from the
    publisher, as with every strategy).
    """

    def __init__(self, engine: StateSwapper, pool: VersionListener | None = None, current_version: int | None = None):
        super().__init__(current_version)
        self.engine = engine
        self.pool = pool

    def push(self, named: NamedTensors, version: int) -> SyncReport:
        self.check_version(version)
        t0 = time.perf_counter()
        state = dict(named)
        self.engine.swap_weights(state, version, source=f"the gathered weights of version {version}")
        if self.pool is not None:
            self.pool.mark_updated(version)
        self.version = version
        n_bytes = sum(t.numel() * t.element_size() for t in state.values())
        report = SyncReport(version, time.perf_counter() - t0, num_tensors=len(state), num_bytes=n_bytes,
                            num_buckets=0, num_params=sum(t.numel() for t in state.values()))
        logger.info("in-memory weight sync v%d: %d tensors, %.1f MB copied into the colocated engine in %.3fs",
                    version, len(state), n_bytes / 1e6, report.seconds)
        return report
