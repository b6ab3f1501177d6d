"""Weight sync building blocks: buckets, atomic disk versions, the tensor-path payload, partial-version tags."""
from __future__ import annotations

import ast
import base64
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from megatron_pz.errors import UserError
from megatron_pz.engine.weights import read_safetensors_dir
from megatron_pz.rollout.sglang_wire import parse_weight_version
from megatron_pz.weight_sync import DiskWeightSync, TensorWeightSync, iter_buckets
from megatron_pz.weight_sync.tensor import serialize_flattened_bucket_local

NUM_GPUS = 0
REPO = Path(__file__).resolve().parents[2]


def _named(sizes):
    return [(f"t{i}", torch.full((n,), float(i))) for i, n in enumerate(sizes)]


def test_buckets_respect_the_byte_limit_and_keep_order():
    named = _named([10, 10, 10, 50, 5])  # float32: 40, 40, 40, 200, 20 bytes
    buckets = list(iter_buckets(named, bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    assert list(iter_buckets([], 100)) == []


class _RecordingEngine:
    def __init__(self):
        self.calls = []

    def update_weights_from_disk(self, path, version):
        self.calls.append((path, version))
        assert Path(path).is_dir()  # the folder is complete before the engine hears of it

    def update_weights_from_tensor(self, payloads, version, load_format="flattened_bucket"):
        self.calls.append((len(payloads), version, load_format))

    def flush_cache(self):
        self.calls.append("flush")


def test_disk_versions_are_atomic_complete_and_increasing(tmp_path):
    engine = _RecordingEngine()
    named = _named([1000, 3000, 10])
    sync = DiskWeightSync(engine, tmp_path / "w", shard_bytes=8000, keep_last=2)
    report = sync.push(named, 1)
    folder = tmp_path / "w" / "v00000001"
    assert engine.calls == [(str(folder), 1)] and report.num_buckets == 3 and report.num_params == 4010
    back = read_safetensors_dir(folder)
    assert set(back) == {"t0", "t1", "t2"} and torch.equal(back["t1"], named[1][1])
    with pytest.raises(UserError, match="not above"):
        sync.push(named, 1)
    # A failed write leaves neither a version folder nor a temporary one behind.

    def broken():
        yield "t0", torch.zeros(3)
        raise RuntimeError("trainer died mid-gather")

    with pytest.raises(RuntimeError):
        sync.push(broken(), 2)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["v00000001"]
    sync.push(named, 2)
    sync.push(named, 3)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["v00000002", "v00000003"]
    with pytest.raises(UserError, match="twice"):
        sync.push(named + named[:1], 4)


def test_a_resumed_run_replaces_versions_written_after_its_checkpoint(tmp_path):
    """Killed between the weight sync of step 3 and its checkpoint: v3 is on disk, the checkpoint says version 2.
    The resumed run must be able to write v3 again (it failed with 'already exists')."""
    w = tmp_path / "w"
    first = DiskWeightSync(_RecordingEngine(), w, keep_last=5)
    for v in (1, 2, 3):
        first.push(_named([10]), v)
    (w / ".v00000004.tmp999").mkdir()  # a writer killed mid-write
    (w / "notes.txt").write_text("not ours")
    resumed = DiskWeightSync(_RecordingEngine(), w, keep_last=5, current_version=2)
    with pytest.raises(UserError, match="already exists"):
        resumed.push(_named([10]), 3)  # without the clean-up
    assert resumed.drop_versions_after(2) == [".v00000004.tmp999", "v00000003"]
    assert sorted(p.name for p in w.iterdir()) == ["notes.txt", "v00000001", "v00000002"]
    resumed.push(_named([7]), 3)
    assert torch.equal(read_safetensors_dir(w / "v00000003")["t0"], torch.zeros(7))
    assert DiskWeightSync(None, tmp_path / "missing").drop_versions_after(0) == []


def _decode(payload: str):
    """What SGLang's scheduler does: base64 -> unpickle ({"flattened_tensor", "metadata"}) -> views."""
    blob = pickle.loads(base64.b64decode(payload))
    out = {}
    for m in blob["metadata"]:
        out[m.name] = blob["flattened_tensor"][m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)
    return out


def test_tensor_payload_roundtrips_mixed_dtypes():
    bucket = [("a", torch.randn(3, 4)), ("b", torch.arange(6, dtype=torch.int64)), ("c", torch.randn(5).bfloat16())]
    got = _decode(serialize_flattened_bucket_local(bucket))
    for name, t in bucket:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def _sglang_allowed_globals() -> set[tuple[str, str]] | None:
    for base in (os.environ.get("SGLANG_SRC"), str(REPO / ".cache" / "sglang-src")):
        path = Path(base or "/nonexistent") / "sglang" / "srt" / "utils" / "common.py"
        if path.is_file():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name == "SafeUnpickler":
                    for stmt in node.body:
                        if isinstance(stmt, ast.Assign) and stmt.targets[0].id == "ALLOWED_GLOBALS":
                            return {tuple(e.value for e in t.elts) for t in stmt.value.elts}
    return None


def test_tensor_payload_only_uses_globals_sglang_safe_unpickler_allows():
    allowed = _sglang_allowed_globals()
    if allowed is None:
        pytest.skip("SGLang source not found (bash tools/install.sh)")
    used = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            used.add((module, name))
            return super().find_class(module, name)

    payload = serialize_flattened_bucket_local([("w", torch.randn(2, 3)), ("b", torch.zeros(4).half())])
    Recorder(io.BytesIO(base64.b64decode(payload))).load()
    assert used and used <= allowed, f"rejected by sglang SafeUnpickler: {used - allowed}"


def test_tensor_sync_tags_all_but_the_last_bucket_partial():
    engine = _RecordingEngine()
    sync = TensorWeightSync(engine, tp_size=2, bucket_bytes=64)  # type: ignore[arg-type]
    sync.push(_named([10, 10, 10]), 7)  # 40 bytes each: three buckets
    assert engine.calls == [(2, "7-partial", "flattened_bucket"), (2, "7-partial", "flattened_bucket"),
                            (2, "7", "flattened_bucket"), "flush"]
    assert parse_weight_version("7-partial") == -1 and parse_weight_version("7") == 7
    assert parse_weight_version("default") == -1
    with pytest.raises(UserError):
        sync.push(_named([1]), 7)


class _Versions:
    def __init__(self):
        self.marked = []

    def mark_updated(self, version):
        self.marked.append(version)


def test_in_memory_sync_copies_a_complete_state_in_place_or_nothing(tiny_qwen3_hf):
    """The colocated engine of a model-parallel run (``InMemoryWeightSync``): built from config.json and loaded
    like ``trainer.colocate`` does, a push copies the tensors into the same parameter storage, bit for bit, and
    moves engine, pool and strategy to the version; a state with a NaN is refused whole, naming the tensor."""
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.model import build_model
    from megatron_pz.errors import CheckpointError
    from megatron_pz.trainer.colocate import load_state
    from megatron_pz.weight_sync import InMemoryWeightSync

    state = read_safetensors_dir(tiny_qwen3_hf)
    lm = build_model(tiny_qwen3_hf, "float32")
    load_state(lm, state, "the initial weights")
    engine = EmbeddedEngine(tiny_qwen3_hf, loaded=lm)
    held = lm.model.state_dict()
    assert all(torch.equal(held[n], t) for n, t in state.items())
    ptrs = {n: t.data_ptr() for n, t in held.items()}
    pool = _Versions()
    sync = InMemoryWeightSync(engine, pool=pool, current_version=0)

    new = {n: t + 0.01 * (i + 1) for i, (n, t) in enumerate(state.items())}
    report = sync.push(new.items(), 1)
    held = lm.model.state_dict()
    assert all(torch.equal(held[n], t) for n, t in new.items())
    assert {n: t.data_ptr() for n, t in held.items()} == ptrs  # copied into the storage, nothing re-bound
    assert engine.weight_version() == sync.version == 1 and pool.marked == [1]
    assert (report.num_tensors, report.num_bytes) == (len(new), sum(t.numel() * 4 for t in new.values()))
    assert report.path is None and report.num_buckets == 0

    bad = dict(new)
    name = sorted(bad)[1]
    bad[name] = bad[name].clone()
    bad[name].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=f"{name}.*NaN"):
        sync.push(bad.items(), 2)
    assert engine.weight_version() == sync.version == 1 and pool.marked == [1]
    assert all(torch.equal(lm.model.state_dict()[n], t) for n, t in new.items())
    with pytest.raises(UserError, match="not above"):
        sync.push(new.items(), 1)
