"""Tensor weight sync: colocated SGLang, buckets handed over as CUDA IPC handles (/update_weights_from_tensor).

Each bucket is flattened into one uint8 tensor (``FlattenedTensorBucket``), serialised with
``MultiprocessingSerializer`` (ForkingPickler -> CUDA IPC handles) and base64, then sent with
``load_format="flattened_bucket"``: the format ``WeightUpdater._update_weights_from_flattened_bucket`` in
``sglang/srt/model_executor/model_runner_components/weight_updater.py`` reconstructs. slime's
``update_weight_from_tensor.py``.
"""
from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence

import torch

from megatron_pz.errors import RolloutError
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


def serialize_flattened_bucket(bucket: Sequence[tuple[str, torch.Tensor]]) -> str:
    """One bucket as SGLang's ``flattened_bucket`` payload: base64(ForkingPickler({"flattened_tensor", "metadata"})).

    With SGLang importable (GPU machines) its own ``FlattenedTensorBucket``/``MultiprocessingSerializer`` are used,
    after ``monkey_patch_torch_reductions`` (CUDA IPC handles keyed by device UUID). Without it, an equivalent
    payload is built by ``serialize_flattened_bucket_local``. CUDA tensors require SGLang in the trainer's
    environment.
    """
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except Exception:  # ImportError, or the CPU import chain failing (triton, CUDA torchvision)
        if any(t.is_cuda for _, t in bucket):
            raise RolloutError("update_weights_from_tensor with CUDA tensors needs sglang importable in the trainer "
                               "(CUDA IPC handles are made by its patched torch reductions)") from None
        return serialize_flattened_bucket_local(bucket)
    monkey_patch_torch_reductions()
    fb = FlattenedTensorBucket(named_tensors=list(bucket))
    payload = {"flattened_tensor": fb.get_flattened_tensor(), "metadata": fb.get_metadata()}
    return MultiprocessingSerializer.serialize(payload, output_str=True)


def serialize_flattened_bucket_local(bucket: Sequence[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``flattened_bucket`` payload built without SGLang (CPU tensors).

    ``flattened_tensor`` is the bucket's bytes back to back, uint8 [sum of nbytes]; ``metadata`` holds one
    ``SimpleNamespace`` per tensor (name, shape, dtype, start_idx, end_idx, numel in bytes): a type SGLang's
    ``SafeUnpickler`` allows, and the updater reads only attributes.
    """
    from multiprocessing.reduction import ForkingPickler
    from types import SimpleNamespace

    flat, metadata, offset = [], [], 0
    for name, t in bucket:
        b = t.detach().contiguous().flatten().view(torch.uint8)
        metadata.append(SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=offset,
                                        end_idx=offset + b.numel(), numel=b.numel()))
        flat.append(b)
        offset += b.numel()
    buf = io.BytesIO()
    ForkingPickler(buf).dump({"flattened_tensor": torch.cat(flat), "metadata": metadata})
    return base64.b64encode(buf.getvalue()).decode()


class TensorWeightSync(VersionedSync):
    """Push buckets to one colocated SGLang engine through CUDA IPC (``/update_weights_from_tensor``).

    SGLang wants one payload per engine TP rank (each rank opens only its own, ``tp_worker.deserialize_own_rank``).
    By default the payload made on this process's GPU is given to every rank (IPC handles open across GPUs of
    a node); ``gather_payloads``, if given, is called with this rank's payload and must return one payload per
    engine TP rank in rank order, e.g. a gloo ``gather_object`` over the colocated trainer ranks (slime's way,
    which keeps every copy on the reading GPU). SGLang loads each bucket as it arrives: every bucket but the last
    is tagged ``"<v>-partial"``.
    """

    def __init__(self, client: WeightUpdater, tp_size: int = 1, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 current_version: int | None = None,
                 gather_payloads: Callable[[str], list[str]] | None = None):
        super().__init__(current_version)
        self.client = client
        self.tp_size = tp_size
        self.bucket_bytes = bucket_bytes
        self.gather_payloads = gather_payloads

    def push(self, named: NamedTensors, version: int) -> SyncReport:
        self.check_version(version)
        t0 = time.perf_counter()
        n_tensors = n_bytes = n_buckets = n_params = 0
        for bucket, last in with_last_flag(iter_buckets(named, self.bucket_bytes)):
            payload = serialize_flattened_bucket(bucket)
            payloads = self.gather_payloads(payload) if self.gather_payloads else [payload] * self.tp_size
            if len(payloads) != self.tp_size:
                raise RolloutError(f"gather_payloads returned {len(payloads)} payloads for {self.tp_size} TP ranks")
            self.client.update_weights_from_tensor(payloads, version_tag(version, last))
            n_buckets += 1
            n_tensors += len(bucket)
            n_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            n_params += sum(t.numel() for _, t in bucket)
            # Fresh buffers per bucket (slime): IPC handles of a reused buffer may still be read by the engine.
            del payload, payloads, bucket
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()
        self.client.flush_cache()
        self.version = version
        return SyncReport(version, time.perf_counter() - t0, n_tensors, n_bytes, n_buckets, n_params)
