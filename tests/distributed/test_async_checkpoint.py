"""Asynchronous checkpoint saves (``checkpoint.async_save``, ``checkpoint/background.py``): the same files as a
synchronous save, published only once written, immune to the next step's in-place updates, and a failed write
named at the next finalize with the previous checkpoint still current.

Runs inside a spawned single-rank world so Megatron's global state stays out of the test process.
"""
import shutil
import time
from pathlib import Path

import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc


def _build(hf_dir):
    from megatron_pz.config import OptimConfig
    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.trainer.optimizer import setup_training

    hf = HFCheckpoint(hf_dir)
    arch = ModelArch.from_hf_config(hf.config())
    chunks = build_model(arch, ModelConfig(dtype="fp32"))
    load_hf_into_model(chunks, hf.get, arch)
    return arch, setup_training(chunks, OptimConfig(), total_steps=10)


def _adam_states(training):
    """Every optimizer state tensor (exp_avg, exp_avg_sq, step) in a stable order."""
    inner = training.optimizer.optimizer
    out = []
    for group in inner.param_groups:
        for p in group["params"]:
            out += [(name, t) for name, t in sorted(inner.state[p].items()) if torch.is_tensor(t)]
    return out


def _snapshot(arch, training):
    model = {k: v.detach().clone() for k, v in training.model[0].module.state_dict().items()
             if torch.is_tensor(v) and not k.endswith("_extra_state")}
    return model, [(n, t.detach().clone()) for n, t in _adam_states(training)]


def _loaded(hf_dir, root):
    """A fresh model + optimizer restored from ``root``, snapshotted."""
    from megatron_pz import checkpoint as ckpt

    arch, training = _build(hf_dir)
    ckpt.load(root, training.model, arch, optimizer=training.optimizer)
    return _snapshot(arch, training)


def _assert_same(got, want, what):
    (gm, go), (wm, wo) = got, want
    assert gm.keys() == wm.keys(), what
    for k in wm:
        assert torch.equal(gm[k], wm[k]), f"{what}: model tensor {k}"
    assert [n for n, _ in go] == [n for n, _ in wo] and len(wo) > 0, what
    for (n, a), (_, b) in zip(go, wo):
        assert torch.equal(a, b), f"{what}: optimizer state {n}"


def _gate_writes(gate: Path) -> None:
    """Make every background write wait until ``gate`` exists: the test decides when a write may start, so
    what it does meanwhile (change tensors, remove the folder) surely happens while the save is in flight."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data_multiproc

    def gated(*args, **kwargs):
        while not gate.exists():
            time.sleep(0.01)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(gated)


def _worker(hf_dir: str, work: str) -> None:
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.checkpoint.optimizer_state import materialise_optimizer_state
    from megatron_pz.errors import CheckpointError
    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    work = Path(work)
    arch, training = _build(hf_dir)
    materialise_optimizer_state(training.optimizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct, non-trivial optimizer state (Adam moments), as after some steps
        for _, t in _adam_states(training):
            if t.is_floating_point() and t.numel() > 1:
                t.copy_(torch.rand(t.shape, generator=gen))
    before = _snapshot(arch, training)
    meta = {"step": 1, "corpus": {"0": {"offset": 7}}}

    sync_root, async_root = work / "sync", work / "async"
    ckpt.save(sync_root, 1, training.model, arch, optimizer=training.optimizer, meta=meta)

    # Asynchronous, the write held back until the gate opens: the next "step" changes every model weight and
    # optimizer moment in place while the checkpoint is in flight.
    gate = work / "gate"
    _gate_writes(gate)
    saves = ckpt.BackgroundSaves()
    ckpt.save(async_root, 1, training.model, arch, optimizer=training.optimizer, meta=meta, background=saves)
    assert saves.in_flight == "iter_0000001"
    assert not (async_root / ckpt.TRACKER).exists() and not (async_root / "iter_0000001").exists()
    assert (async_root / ".iter_0000001.tmp" / ckpt.META).exists()  # the run state is written up front
    with torch.no_grad():
        for p in training.model[0].module.parameters():
            p.add_(1.0)
        for _, t in _adam_states(training):
            t.add_(1.0)
    assert not saves.poll()  # still writing: nothing published
    assert not (async_root / ckpt.TRACKER).exists()
    gate.touch()
    saves.wait()
    assert saves.in_flight is None and saves.last_write_s is not None
    assert (async_root / ckpt.TRACKER).read_text().strip() == "1" and not list(async_root.glob(".iter_*"))

    # Bit for bit: the same shard files and run state as the synchronous save, and both load the weights and
    # optimizer state of the moment the save was called, not the ones changed while the write was in flight.
    sync_dir, async_dir = sync_root / "iter_0000001", async_root / "iter_0000001"
    shards = sorted(p.name for p in sync_dir.glob("*.distcp"))
    assert shards and shards == sorted(p.name for p in async_dir.glob("*.distcp"))
    for name in [*shards, ckpt.META, "metadata.json"]:
        assert (sync_dir / name).read_bytes() == (async_dir / name).read_bytes(), name
    _assert_same(_loaded(hf_dir, async_root), before, "async checkpoint vs the state at save time")
    _assert_same(_loaded(hf_dir, sync_root), before, "sync checkpoint vs the state at save time")

    # A write that fails in the background (its folder removed under it) is named at the next finalize, on
    # this rank as on all; the tracker still names iteration 1, which still loads.
    gate.unlink()
    ckpt.save(async_root, 2, training.model, arch, optimizer=training.optimizer, meta={"step": 2},
              background=saves)
    shutil.rmtree(async_root / ".iter_0000002.tmp")
    gate.touch()
    try:
        saves.wait()
        raise AssertionError("the failed background write was not reported")
    except CheckpointError as exc:
        assert "iter_0000002" in str(exc) and "the tracker still names iteration 1" in str(exc), exc
        assert "rank 0:" in str(exc) and "No such file or directory" in str(exc) and "__0_0.distcp" in str(exc), exc
    assert saves.in_flight is None
    assert (async_root / ckpt.TRACKER).read_text().strip() == "1" and not (async_root / "iter_0000002").exists()
    _assert_same(_loaded(hf_dir, async_root), before, "the previous checkpoint after a failed write")

    # At most one in flight: a second save while one is being written is refused before it touches anything.
    gate.unlink()
    ckpt.save(async_root, 3, training.model, arch, optimizer=training.optimizer, background=saves)
    try:
        ckpt.save(async_root, 4, training.model, arch, optimizer=training.optimizer, background=saves)
        raise AssertionError("a second save started while one was in flight")
    except CheckpointError as exc:
        assert "iter_0000003" in str(exc), exc
    gate.touch()
    saves.wait()
    assert ckpt.resolve(async_root).iteration == 3 and not (async_root / ".iter_0000004.tmp").exists()


def test_async_save_equals_sync_save_and_publishes_only_when_written(tiny_llama_hf, tmp_path):
    spawn_local(_worker, 1, (tiny_llama_hf, str(tmp_path)))
