"""Rollout side of weight sync: push the trainer's full tensors (HF names) to the rollout engines, versioned.

Input is an iterable of ``(hf_name, full torch.Tensor)`` pairs; the trainer builds it from Megatron (gather TP/PP
shards, convert names with ``megatron_pz.convert``). Three transports, one per file in slime
(``update_weight_from_{disk,tensor,distributed}.py``), here one class each:

* ``DiskWeightSync``: write safetensors shards into ``<weights_dir>/.v<version>.tmp*``, rename to
  ``v<version>`` (atomic), then ``/update_weights_from_disk``. For the embedded server and debugging.
* ``TensorWeightSync``: colocated SGLang; buckets are flattened into one uint8 tensor
  (``FlattenedTensorBucket``), serialised with ``MultiprocessingSerializer`` (ForkingPickler -> CUDA IPC handles)
  and base64, then ``/update_weights_from_tensor`` with ``load_format="flattened_bucket"`` (the format
  ``WeightUpdater._update_weights_from_flattened_bucket`` in
  ``sglang/srt/model_executor/model_runner_components/weight_updater.py`` reconstructs).
* ``DistributedWeightSync``: disaggregated SGLang; the trainer is rank 0 of a group with every engine rank
  (``/init_weights_update_group``); per bucket, ``/update_weights_from_distributed`` announces names/dtypes/shapes
  and the tensors follow by broadcast, one by one in ``names`` order (``receive_weights_from_distributed``).

Buckets hold at most ``bucket_bytes`` (default 512 MiB, slime's default: per-tensor updates are ~10x slower).
Versions strictly increase. SGLang loads each bucket as it arrives, so the tensor and distributed paths pause
generation around the transfer and tag every bucket but the last ``"<v>-partial"``: if a transfer dies midway,
the engine reports a non-integer version, samples parse to version -1 and are never trained on, and generation
stays paused. The embedded engine additionally stages buckets and swaps all at once.

``check_weights`` / ``check_logprobs`` compare the engine with the trainer (``--check-weight-update-equal``).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_pz.errors import RolloutError, UserError
from megatron_pz.rollout.protocol import RolloutEngine, SamplingParams
from megatron_pz.rollout.sglang_client import PARTIAL_VERSION_SUFFIX, SGLangClient

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 * 1024 ** 2
NamedTensors = Iterable[tuple[str, torch.Tensor]]
_VERSION_DIR = re.compile(r"^v(\d{8})$")
_TMP_DIR = re.compile(r"^\.v\d{8}\.tmp\d+$")
# Files copied next to the weights so that the folder is a complete HF model (SGLang reads config.json).
_HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


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


def _with_last_flag(items: Iterable) -> Iterator[tuple[object, bool]]:
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


class _Versioned:
    """Strictly increasing versions, checked before any byte is sent."""

    def __init__(self, current_version: int | None):
        self.version = current_version

    def _check(self, version: int) -> None:
        if self.version is not None and version <= self.version:
            raise UserError(f"weight version {version} is not above the last pushed version {self.version}")


# --------------------------------------------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------------------------------------------

class DiskWeightSync(_Versioned):
    """Write an HF safetensors folder per version under a shared directory and tell the engine to load it.

    ``weights_dir`` must be visible at the same path to the servers (a shared filesystem on a cluster) and, for
    the embedded server, lie below its ``--weights-dir``. ``hf_config_dir`` (config.json, tokenizer files) is
    copied next to the shards so every version folder is a complete HF model. The ``keep_last`` newest versions
    are kept on disk.
    """

    def __init__(self, engine: RolloutEngine, weights_dir: str | Path, hf_config_dir: str | Path | None = None,
                 shard_bytes: int = DEFAULT_BUCKET_BYTES, keep_last: int = 2, current_version: int | None = None):
        super().__init__(current_version)
        self.engine = engine
        self.weights_dir = Path(weights_dir)
        self.hf_config_dir = Path(hf_config_dir) if hf_config_dir else None
        self.shard_bytes = shard_bytes
        self.keep_last = keep_last

    def write(self, named: NamedTensors, version: int) -> tuple[Path, int, int, int, int]:
        """Write version ``version`` atomically; returns (folder, tensors, bytes, shards, parameters)."""
        from safetensors.torch import save_file

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        final = self.weights_dir / f"v{version:08d}"
        if final.exists():
            raise UserError(f"{final} already exists: version {version} was written before")
        tmp = self.weights_dir / f".v{version:08d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weight_map: dict[str, str] = {}
        n_tensors = n_bytes = n_params = shards = 0
        try:
            for shards, bucket in enumerate(iter_buckets(named, self.shard_bytes), start=1):
                fname = f"model-{shards:05d}.safetensors"
                tensors = {}
                for name, t in bucket:
                    if name in weight_map or name in tensors:
                        raise UserError(f"tensor {name!r} was given twice")
                    tensors[name] = t.detach().to("cpu").contiguous()
                    n_bytes += t.numel() * t.element_size()
                    n_params += t.numel()
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in tensors})
                n_tensors += len(tensors)
            if not weight_map:
                raise UserError("no tensors to write")
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": n_bytes}, "weight_map": weight_map}, indent=1))
            if self.hf_config_dir:
                for side in _HF_SIDE_FILES:
                    if (self.hf_config_dir / side).is_file():
                        shutil.copy2(self.hf_config_dir / side, tmp / side)
            os.replace(tmp, final)  # readers see either no folder or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, n_tensors, n_bytes, shards, n_params

    def push(self, named: NamedTensors, version: int) -> SyncReport:
        self._check(version)
        t0 = time.perf_counter()
        path, n_tensors, n_bytes, shards, n_params = self.write(named, version)
        self.engine.update_weights_from_disk(str(path), version)
        self.version = version
        self._prune(keep=path)
        report = SyncReport(version, time.perf_counter() - t0, n_tensors, n_bytes, shards, n_params, str(path))
        logger.info("disk weight sync v%d: %d tensors, %.1f MB in %.2fs", version, n_tensors, n_bytes / 1e6,
                    report.seconds)
        return report

    def drop_versions_after(self, version: int) -> list[str]:
        """Remove version folders above ``version`` and temporary folders of any writer: what a run that died
        after a weight sync but before its checkpoint left behind. The resumed run, restarting from the checkpoint
        at ``version``, writes those versions again (with other weights). Returns the names removed."""
        if not self.weights_dir.is_dir():
            return []
        removed = []
        for p in sorted(self.weights_dir.iterdir()):
            m = _VERSION_DIR.match(p.name)
            if (m and int(m.group(1)) > version) or _TMP_DIR.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def _prune(self, keep: Path) -> None:
        versions = sorted(p for p in self.weights_dir.iterdir() if _VERSION_DIR.match(p.name))
        for old in versions[:-self.keep_last] if self.keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Tensor (colocated SGLang, CUDA IPC)
# --------------------------------------------------------------------------------------------------------------

def serialize_flattened_bucket(bucket: Sequence[tuple[str, torch.Tensor]]) -> str:
    """One bucket as SGLang's ``flattened_bucket`` payload: base64(ForkingPickler({"flattened_tensor", "metadata"})).

    With SGLang importable (GPU machines) its own ``FlattenedTensorBucket``/``MultiprocessingSerializer`` are used,
    after ``monkey_patch_torch_reductions`` (CUDA IPC handles keyed by device UUID). Without it, an equivalent
    payload is built here: metadata as ``SimpleNamespace`` (allowed by SGLang's ``SafeUnpickler``; the updater
    reads only attributes). CUDA tensors require SGLang in the trainer's environment.
    """
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except Exception:  # ImportError, or the CPU import chain failing (triton, CUDA torchvision)
        if any(t.is_cuda for _, t in bucket):
            raise RolloutError("update_weights_from_tensor with CUDA tensors needs sglang importable in the trainer "
                               "(CUDA IPC handles are made by its patched torch reductions)") from None
        return _serialize_flattened_bucket_local(bucket)
    monkey_patch_torch_reductions()
    fb = FlattenedTensorBucket(named_tensors=list(bucket))
    payload = {"flattened_tensor": fb.get_flattened_tensor(), "metadata": fb.get_metadata()}
    return MultiprocessingSerializer.serialize(payload, output_str=True)


def _serialize_flattened_bucket_local(bucket: Sequence[tuple[str, torch.Tensor]]) -> str:
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


class TensorWeightSync(_Versioned):
    """Push buckets to one colocated SGLang engine through CUDA IPC (``/update_weights_from_tensor``).

    SGLang wants one payload per engine TP rank (each rank opens only its own, ``tp_worker.deserialize_own_rank``).
    By default the payload made on this process's GPU is given to every rank (IPC handles open across GPUs of
    a node); ``gather_payloads``, if given, is called with this rank's payload and must return one payload per
    engine TP rank in rank order, e.g. a gloo ``gather_object`` over the colocated trainer ranks (slime's way,
    which keeps every copy on the reading GPU).
    """

    def __init__(self, client: SGLangClient, tp_size: int = 1, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 current_version: int | None = None,
                 gather_payloads: Callable[[str], list[str]] | None = None):
        super().__init__(current_version)
        self.client = client
        self.tp_size = tp_size
        self.bucket_bytes = bucket_bytes
        self.gather_payloads = gather_payloads

    def push(self, named: NamedTensors, version: int) -> SyncReport:
        self._check(version)
        t0 = time.perf_counter()
        n_tensors = n_bytes = n_buckets = n_params = 0
        for bucket, last in _with_last_flag(iter_buckets(named, self.bucket_bytes)):
            payload = serialize_flattened_bucket(bucket)
            tag = str(version) if last else f"{version}{PARTIAL_VERSION_SUFFIX}"
            payloads = self.gather_payloads(payload) if self.gather_payloads else [payload] * self.tp_size
            if len(payloads) != self.tp_size:
                raise RolloutError(f"gather_payloads returned {len(payloads)} payloads for {self.tp_size} TP ranks")
            self.client.update_weights_from_tensor(payloads, tag)
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


# --------------------------------------------------------------------------------------------------------------
# Distributed (disaggregated SGLang, NCCL broadcast; gloo works with the embedded engine on CPU)
# --------------------------------------------------------------------------------------------------------------

class DistributedWeightSync(_Versioned):
    """The trainer as rank 0 of a broadcast group with every rollout-engine rank."""

    def __init__(self, clients: Sequence[SGLangClient], master_address: str, master_port: int,
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
        from megatron_pz.rollout.process_group import init_custom_process_group

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
        from megatron_pz.rollout.process_group import broadcast_from_rank0

        if self.group is None:
            raise RolloutError("DistributedWeightSync.push before init()")
        self._check(version)
        t0 = time.perf_counter()
        self._all(lambda c: c.pause_generation(self.pause_mode), "pause_generation")
        self._all(lambda c: c.flush_cache(), "flush_cache")
        n_tensors = n_bytes = n_buckets = n_params = 0
        for bucket, last in _with_last_flag(iter_buckets(named, self.bucket_bytes)):
            tensors = [(n, t.detach().to(self.device).contiguous()) for n, t in bucket]
            names = [n for n, _ in tensors]
            dtypes = [str(t.dtype).removeprefix("torch.") for _, t in tensors]
            shapes = [list(t.shape) for _, t in tensors]
            tag = str(version) if last else f"{version}{PARTIAL_VERSION_SUFFIX}"
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

    def _all(self, fn: Callable[[SGLangClient], object], what: str) -> None:
        errors = _collect([self._executor.submit(fn, c) for c in self.clients], self.clients)
        if errors:
            raise RolloutError(f"{what} failed: " + "; ".join(errors))


def _collect(futures, clients) -> list[str]:
    errors = []
    for fut, c in zip(futures, clients):
        try:
            fut.result()
        except Exception as exc:
            errors.append(f"{c.base_url}: {exc}")
    return errors


# --------------------------------------------------------------------------------------------------------------
# Check mode: does the engine now serve the trainer's weights?
# --------------------------------------------------------------------------------------------------------------

@dataclass
class CheckReport:
    ok: bool
    max_abs_diff: float
    mean_abs_diff: float
    num_values: int
    worst: str = ""
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"{'OK' if self.ok else 'MISMATCH'}: max |diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g} "
                f"over {self.num_values} values (worst: {self.worst})")


def check_weights(engine, expected: Mapping[str, torch.Tensor], truncate_size: int = 4, atol: float = 1e-6,
                  rtol: float = 1e-2) -> CheckReport:
    """Compare the first ``truncate_size`` rows of each tensor via ``get_weights_by_name``.

    ``engine`` is an ``SGLangClient``/``EmbeddedEngine`` (SGLang returns TP rank 0's rows; with TP the first rows
    are on rank 0, so ``truncate_size`` should stay below the per-rank row count). Tolerance is per value:
    ``atol + rtol * |expected|`` (bf16 engines round to 8 bits of mantissa).
    """
    total = 0.0
    worst_val, worst_name, count, ok = 0.0, "", 0, True
    for name, want in expected.items():
        got = torch.tensor(engine.get_weights_by_name(name, truncate_size), dtype=torch.float32)
        ref = want.detach().float().cpu()[:truncate_size]
        if got.shape != ref.shape:
            return CheckReport(False, float("inf"), float("inf"), count, f"{name}: shape {tuple(got.shape)} vs "
                                                                          f"{tuple(ref.shape)}")
        diff = (got - ref).abs()
        ok &= bool((diff <= atol + rtol * ref.abs()).all())
        total += float(diff.sum())
        count += diff.numel()
        if diff.numel() and float(diff.max()) >= worst_val:
            worst_val, worst_name = float(diff.max()), name
    return CheckReport(ok, worst_val, total / max(count, 1), count, worst_name)


def check_logprobs(engine: RolloutEngine, prompt_ids: Sequence[int],
                   reference_logprobs: Callable[[Sequence[int], Sequence[int], float], Sequence[float]],
                   max_new_tokens: int = 32, temperature: float = 0.0, atol: float = 1e-3) -> CheckReport:
    """Generate on a fixed prompt and compare the engine's logprobs with the trainer's recomputation.

    ``reference_logprobs(prompt_ids, response_ids, temperature)`` must return log softmax(logits / T) at the
    response tokens (log softmax(logits) for T = 0), one per response token: the trainer's forward pass.
    """
    res = engine.generate([list(prompt_ids)], SamplingParams(n=1, max_new_tokens=max_new_tokens,
                                                             temperature=temperature))[0][0]
    ref = torch.tensor(list(reference_logprobs(prompt_ids, res.response_ids, temperature)), dtype=torch.float64)
    got = torch.tensor(res.logprobs, dtype=torch.float64)
    if ref.shape != got.shape:
        return CheckReport(False, float("inf"), float("inf"), 0, f"{len(ref)} reference logprobs for "
                                                                 f"{len(got)} response tokens")
    diff = (got - ref).abs()
    worst = int(diff.argmax()) if diff.numel() else -1
    return CheckReport(bool((diff <= atol).all()), float(diff.max()) if diff.numel() else 0.0,
                       float(diff.mean()) if diff.numel() else 0.0, diff.numel(), f"token {worst}",
                       {"weight_version": res.weight_version, "response_ids": res.response_ids})

