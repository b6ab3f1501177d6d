"""Shared weight sync: the colocated engine reads the trainer's own parameter storage, so a push sends nothing.

At world size 1 with ``rollout.colocate=true`` the embedded engine runs in the trainer process and its HF
parameters are views of the Megatron parameters (``convert.bridge.share_hf_params``). The optimizer's in-place
step has already changed what the engine computes with; a push re-points the views and re-materialises the
tensors that could not be shared (q/k/v of the fused QKV), under the engine's generation lock, and moves the
version. No gather, no disk, no broadcast.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol, TypeVar

from megatron_pz.weight_sync.base import NamedTensors, SyncReport, VersionedSync

logger = logging.getLogger(__name__)
T = TypeVar("T")


class InPlaceUpdater(Protocol):
    """An engine whose parameters are the trainer's (``engine.EmbeddedEngine.update_weights_in_place``)."""

    def update_weights_in_place(self, version: int, refresh: Callable[[], T]) -> T: ...


class VersionListener(Protocol):
    """The data owner's pool, told of the version the engine now serves (``RolloutPool.mark_updated``)."""

    def mark_updated(self, version: int) -> None: ...


class SharedWeightSync(VersionedSync):
    """A weight version bump for an engine that shares the trainer's storage.

    ``refresh()`` re-binds the engine's parameters and returns an object with ``shared_bytes`` and
    ``copied_bytes``, ``copied`` and ``num_params`` (``convert.bridge.SharedParams``); the report counts the
    copied tensors and bytes, the only ones moved.
    """

    needs_tensors = False
    """The publisher gathers nothing for this strategy: ``push`` ignores its tensors."""

    def __init__(self, engine: InPlaceUpdater, refresh: Callable[[], Any], pool: VersionListener | None = None,
                 current_version: int | None = None):
        super().__init__(current_version)
        self.engine = engine
        self.refresh = refresh
        self.pool = pool

    def push(self, named: NamedTensors, version: int) -> SyncReport:
        self.check_version(version)
        t0 = time.perf_counter()
        bound = self.engine.update_weights_in_place(version, self.refresh)
        if self.pool is not None:
            self.pool.mark_updated(version)
        self.version = version
        report = SyncReport(version, time.perf_counter() - t0, num_tensors=len(bound.copied),
                            num_bytes=bound.copied_bytes, num_buckets=0,
                            num_params=bound.num_params)
        logger.info("shared weight sync v%d: %.1f MB shared in place, %.1f MB re-materialised (%d tensors) in %.3fs",
                    version, bound.shared_bytes / 1e6, bound.copied_bytes / 1e6, len(bound.copied), report.seconds)
        return report
