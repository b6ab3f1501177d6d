"""HF folder reading/writing: clear errors for bad input, atomic writes."""
import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_pz.convert.hf_io import HFCheckpoint, save_hf_folder
from megatron_pz.errors import CheckpointError
from megatron_pz.io import atomic_dir


def test_sharded_folder_reads_lazily(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "m-1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "m-2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    ck = HFCheckpoint(tmp_path)
    assert sorted(ck.keys()) == ["a", "b"] and ck.get("b").shape == (3,)
    with pytest.raises(CheckpointError, match=r"tensor 'c' is missing"):
        ck.get("c")


def test_missing_shard_named(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "m-1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"missing checkpoint shard .*m-2\.safetensors"):
        HFCheckpoint(tmp_path)


def test_truncated_safetensors_named(tmp_path):
    save_file({"a": torch.ones(1000)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        HFCheckpoint(tmp_path).get("a")


def test_bad_index_and_empty_folder(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        HFCheckpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HFCheckpoint(empty)


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    dst = tmp_path / "out"
    save_hf_folder(dst, [("w", torch.ones(2))], {"model_type": "llama"})
    with pytest.raises(RuntimeError):
        with atomic_dir(dst) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp litter
    assert torch.equal(HFCheckpoint(dst).get("w"), torch.ones(2))


def test_shards_split_by_size(tmp_path):
    dst = tmp_path / "out"
    save_hf_folder(dst, [(f"w{i}", torch.zeros(256)) for i in range(4)], {}, max_shard_bytes=2048)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 2
    assert all(HFCheckpoint(dst).get(f"w{i}").numel() == 256 for i in range(4))


def test_export_finds_the_tokenizer_of_a_converted_checkpoint_or_of_a_training_run(tmp_path):
    """``megatron-pz convert --to hf`` copies tokenizer files from <root>/hf_tokenizer (written by --to mcore) or,
    for a training run's checkpoints/, from the run's hf_meta/ (written by the trainer)."""
    from megatron_pz.convert.api import hf_aux_dir

    run = tmp_path / "run"
    root = run / "checkpoints"
    root.mkdir(parents=True)
    assert hf_aux_dir(root) is None
    (run / "hf_meta").mkdir()
    assert hf_aux_dir(root) == run / "hf_meta"
    (root / "hf_tokenizer").mkdir()
    assert hf_aux_dir(root) == root / "hf_tokenizer"  # the checkpoint's own files win
