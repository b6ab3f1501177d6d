"""What every weight-sync strategy shares: the ``WeightSync`` protocol, its ``SyncReport``, buckets, versions.

A strategy pushes the trainer's full tensors (HF names) to the rollout engines as one weight version. Input is an
iterable of ``(hf_name, full torch.Tensor)`` pairs; the trainer builds it from Megatron (gather TP/PP shards,
convert names with ``megatron_pz.convert``). Versions strictly increase: ``push`` checks that before any byte is
sent and records the version once the engines hold it.

The strategies, each a ``VersionedSync`` (all exported by ``megatron_pz.weight_sync``):
  disk.py         ``DiskWeightSync``: a safetensors folder per version, then /update_weights_from_disk
  tensor.py       ``TensorWeightSync``: colocated SGLang, CUDA IPC buckets to /update_weights_from_tensor
  distributed.py  ``DistributedWeightSync``: disaggregated SGLang, rank 0 broadcasts each bucket (NCCL; gloo on CPU)
  shared.py       ``SharedWeightSync``: the colocated embedded engine reads the trainer's own storage (world size 1)
  memory.py       ``InMemoryWeightSync``: the colocated embedded engine of a model-parallel run copies the gathered
                  tensors in place (world size > 1)
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import torch

from megatron_pz.errors import UserError
from megatron_pz.rollout.updater import PARTIAL_VERSION_SUFFIX

DEFAULT_BUCKET_BYTES = 512 * 1024 ** 2
"""slime's default bucket: per-tensor updates are ~10x slower."""
NamedTensors = Iterable[tuple[str, torch.Tensor]]
T = TypeVar("T")


@dataclass
class SyncReport:
    """What one push did, for logs and the benchmark."""

    version: int
    seconds: float
    num_tensors: int
    num_bytes: int
    num_buckets: int
    num_params: int = 0
    path: str | None = None

    @property
    def seconds_per_100m_params(self) -> float:
        return self.seconds / max(self.num_params / 1e8, 1e-12)


@runtime_checkable
class WeightSync(Protocol):
    """One Megatron -> rollout weight path (disk.py, tensor.py, distributed.py, shared.py, memory.py)."""

    version: int | None
    """The last version pushed (None before the first push of a fresh run)."""

    def push(self, named: NamedTensors, version: int) -> SyncReport:
        """Send every tensor as weight version ``version`` (above the last one) and make the engines serve it."""
        ...

    def close(self) -> None:
        """Release what the strategy holds (process groups, threads); the engines keep serving."""
        ...


class VersionedSync:
    """Strictly increasing versions, checked before any byte is sent (the base of every strategy)."""

    def __init__(self, current_version: int | None):
        self.version = current_version

    def check_version(self, version: int) -> None:
        if self.version is not None and version <= self.version:
            raise UserError(f"weight version {version} is not above the last pushed version {self.version}")

    def close(self) -> None:
        """Nothing to release by default."""


def iter_buckets(named: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors in order into buckets of at most ``bucket_bytes`` (a bigger tensor is a bucket by itself)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def with_last_flag(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yield (item, is_last) with one item of lookahead (the last bucket carries the real version)."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def version_tag(version: int, last: bool) -> str:
    """The weight_version string of one bucket: ``"<v>"`` for the last, ``"<v>-partial"`` before it."""
    return str(version) if last else f"{version}{PARTIAL_VERSION_SUFFIX}"
