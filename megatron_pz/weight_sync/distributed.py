"""Distributed weight sync: disaggregated SGLang, the trainer broadcasts to every engine rank (NCCL; gloo on CPU).

The trainer is rank 0 of a group with every engine rank (``/init_weights_update_group``); per bucket,
``/update_weights_from_distributed`` announces names/dtypes/shapes and the tensors follow by broadcast, one by
one in ``names`` order (SGLang's ``receive_weights_from_distributed``). slime's ``update_weight_from_distributed.py``.

SGLang loads each bucket as it arrives, so generation is paused around the transfer and every bucket but the
last is tagged ``"<v>-partial"``: if a transfer dies midway, the engines report a non-integer version, samples
parse to version -1 and are never trained on, and generation stays paused. The embedded engine additionally
stages buckets and swaps all at once.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from megatron_pz.errors import RolloutError, UserError
from megatron_pz.rollout.process_group import broadcast_from_rank0, init_custom_process_group
from megatron_pz.rollout.updater import WeightUpdater
from megatron_pz.weight_sync.base import (
    DEFAULT_BUCKET_BYTES,
    NamedTensors,
    SyncReport,
    VersionedSync,
    iter_buckets,
    version_tag,
    with_last_flag,
)

logger = logging.getLogger(__name__)


class DistributedWeightSync(VersionedSync):
    """The trainer as rank 0 of a broadcast group with every rollout-engine rank.

    ``clients`` are the per-server updaters (``RolloutPool.clients``); server ``i`` holds ranks
    ``1 + sum(tp_sizes[:i])`` onwards. ``init()`` forms the group before the first ``push``.
    """

    def __init__(self, clients: Sequence[WeightUpdater], master_address: str, master_port: int,
                 tp_sizes: Sequence[int] | None = None, group_name: str = "weight_update_group",
                 backend: str = "nccl", bucket_bytes: int = DEFAULT_BUCKET_BYTES, pause_mode: str = "abort",
                 device: str | torch.device | None = None, current_version: int | None = None,
                 timeout_s: float = 600.0):
        super().__init__(current_version)
        self.clients = list(clients)
        self.tp_sizes = list(tp_sizes or [1] * len(self.clients))
        if len(self.tp_sizes) != len(self.clients):
            raise UserError(f"{len(self.tp_sizes)} tp_sizes for {len(self.clients)} servers")
        self.master_address, self.master_port = master_address, master_port
        self.group_name, self.backend = group_name, backend
        self.bucket_bytes = bucket_bytes
        self.pause_mode = pause_mode
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.timeout_s = timeout_s
        self.group = None
        self._executor = ThreadPoolExecutor(max_workers=max(1, len(self.clients)), thread_name_prefix="wsync")

    @property
    def world_size(self) -> int:
        return 1 + sum(self.tp_sizes)

    def init(self) -> None:
        """Form the group: each server joins over HTTP while the trainer joins as rank 0 (both block)."""
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.clients))]
        futures = [self._executor.submit(c.init_weights_update_group, self.master_address, self.master_port, off,
                                         self.world_size, self.group_name, self.backend)
                   for c, off in zip(self.clients, offsets)]
        try:
            self.group = init_custom_process_group(self.backend, self.master_address, self.master_port,
                                                   self.world_size, 0, self.group_name, self.timeout_s)
        finally:
            errors = _collect(futures, self.clients)
        if errors:
            raise RolloutError("init_weights_update_group failed: " + "; ".join(errors))

    def push(self, named: NamedTensors, version: int) -> SyncReport:
        if self.group is None:
            raise RolloutError("DistributedWeightSync.push before init()")
        self.check_version(version)
        t0 = time.perf_counter()
        self._all(lambda c: c.pause_generation(self.pause_mode), "pause_generation")
        self._all(lambda c: c.flush_cache(), "flush_cache")
        n_tensors = n_bytes = n_buckets = n_params = 0
        for bucket, last in with_last_flag(iter_buckets(named, self.bucket_bytes)):
            tensors = [(n, t.detach().to(self.device).contiguous()) for n, t in bucket]
            names = [n for n, _ in tensors]
            dtypes = [str(t.dtype).removeprefix("torch.") for _, t in tensors]
            shapes = [list(t.shape) for _, t in tensors]
            tag = version_tag(version, last)
            futures = [self._executor.submit(c.update_weights_from_distributed, names, dtypes, shapes, tag,
                                             self.group_name) for c in self.clients]
            try:
                handles = [broadcast_from_rank0(t, self.group, async_op=True) for _, t in tensors]
                for h in handles:
                    h.wait()
            finally:
                errors = _collect(futures, self.clients)
            if errors:
                # Generation stays paused: the engines may hold a partial update (tagged "<v>-partial").
                raise RolloutError(f"weight sync v{version} failed at bucket {n_buckets} (engines left paused, "
                                   f"version tagged partial): " + "; ".join(errors))
            n_buckets += 1
            n_tensors += len(tensors)
            n_bytes += sum(t.numel() * t.element_size() for _, t in tensors)
            n_params += sum(t.numel() for _, t in tensors)
        self._all(lambda c: c.continue_generation(), "continue_generation")
        self.version = version
        report = SyncReport(version, time.perf_counter() - t0, n_tensors, n_bytes, n_buckets, n_params)
        logger.info("distributed weight sync v%d: %d tensors, %.1f MB, %d buckets in %.2fs", version, n_tensors,
                    n_bytes / 1e6, n_buckets, report.seconds)
        return report

    def close(self) -> None:
        import torch.distributed as dist

        if self.group is not None:
            _collect([self._executor.submit(c.destroy_weights_update_group, self.group_name) for c in self.clients],
                     self.clients)
            dist.destroy_process_group(self.group)
            self.group = None
        self._executor.shutdown(wait=False)

    def _all(self, fn: Callable[[WeightUpdater], object], what: str) -> None:
        errors = _collect([self._executor.submit(fn, c) for c in self.clients], self.clients)
        if errors:
            raise RolloutError(f"{what} failed: " + "; ".join(errors))


def _collect(futures: Sequence[Future], clients: Sequence[WeightUpdater]) -> list[str]:
    """Wait for every call; one "<server>: <error>" line per failed one."""
    errors = []
    for fut, c in zip(futures, clients):
        try:
            fut.result()
        except Exception as exc:
            errors.append(f"{getattr(c, 'base_url', c)!s}: {exc}")
    return errors
