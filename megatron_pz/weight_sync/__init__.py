"""Weight sync: push the trainer's full tensors (HF names) to the rollout engines as one strictly newer version.

Modules (one strategy each; slime's ``update_weight_from_{disk,tensor,distributed}.py``):
  base.py         the ``WeightSync`` protocol (``push(named_tensors, version) -> SyncReport``, ``close()``),
                  ``SyncReport``, bucketing and the version check every strategy shares
  disk.py         ``DiskWeightSync``: one safetensors folder per version, then /update_weights_from_disk
                  (the embedded server, shared filesystems)
  tensor.py       ``TensorWeightSync``: colocated SGLang, CUDA IPC buckets to /update_weights_from_tensor
  distributed.py  ``DistributedWeightSync``: disaggregated SGLang, rank 0 broadcasts each bucket (NCCL; gloo on CPU)
  shared.py       ``SharedWeightSync``: the colocated embedded engine reads the trainer's own storage; a push is a
                  version bump (plus the q/k/v re-materialisation), nothing is gathered or sent
  memory.py       ``InMemoryWeightSync``: the colocated embedded engine of a model-parallel run (on global rank 0)
                  takes the gathered tensors by an in-place copy under its generation lock; no disk, no HTTP
  check.py        ``check_weights`` / ``check_logprobs``: does the engine now serve the trainer's weights?
  publisher.py    ``WeightPublisher``: the one owner of the weight version; gathers the Megatron shards into HF
                  tensors (collective) and pushes them through the strategy as version + 1

The strategies call the engines through ``megatron_pz.rollout.updater.WeightUpdater``. Buckets hold at most
``bucket_bytes`` (default 512 MiB).
"""
from megatron_pz.weight_sync.base import (
    DEFAULT_BUCKET_BYTES,
    NamedTensors,
    SyncReport,
    VersionedSync,
    WeightSync,
    iter_buckets,
)
from megatron_pz.weight_sync.check import CheckReport, check_logprobs, check_weights
from megatron_pz.weight_sync.disk import DiskWeightSync
from megatron_pz.weight_sync.distributed import DistributedWeightSync
from megatron_pz.weight_sync.memory import InMemoryWeightSync
from megatron_pz.weight_sync.shared import SharedWeightSync
from megatron_pz.weight_sync.tensor import TensorWeightSync, serialize_flattened_bucket

__all__ = [
    "DEFAULT_BUCKET_BYTES", "CheckReport", "DiskWeightSync", "DistributedWeightSync", "InMemoryWeightSync",
    "NamedTensors", "SharedWeightSync", "SyncReport", "TensorWeightSync", "VersionedSync", "WeightSync",
    "check_logprobs", "check_weights", "iter_buckets", "serialize_flattened_bucket",
]
