"""The common state of a torch_dist checkpoint in Megatron-Core 0.17+'s layout (a ``common_state`` object inside the
``.distcp`` files, no ``common.pt``), read under whichever release is installed. The files are written with torch's
checkpoint API the way 0.19's ``dist_checkpointing.save`` writes them (tests/mcore_versions writes real ones)."""
import argparse

import pytest
import torch

from megatron_pz import mcore_compat


class Foreign:  # a class on no weights_only allow-list
    pass


def _save_new_layout(folder, common: dict) -> None:
    import torch.distributed.checkpoint as dcp

    # torch's default planner pickles a non-tensor value once, as Megatron-Core's planner does with a ShardedObject's
    # data (global shape (1,): a one-element list).
    dcp.save({"common_state/shard_0_1": [common], "decoder.weight": torch.ones(3)},
             storage_writer=dcp.FileSystemWriter(str(folder)), planner=dcp.DefaultSavePlanner(flatten_state_dict=False),
             no_dist=True)


def test_the_common_state_object_is_read_when_there_is_no_common_pt(tmp_path):
    args = argparse.Namespace(num_layers=2, vocab_size=300)
    _save_new_layout(tmp_path, {"args": args, "iteration": 10, "checkpoint_version": 3.0})
    assert not (tmp_path / mcore_compat.COMMON_FILE).exists()
    assert mcore_compat.has_common_state(tmp_path)
    common = mcore_compat.read_common(tmp_path)
    assert common["iteration"] == 10 and common["args"] == args

    # Written back as common.pt for Megatron-Core 0.16 readers: the same dict, and read from there afterwards.
    assert mcore_compat.write_legacy_common(tmp_path)
    assert torch.load(tmp_path / mcore_compat.COMMON_FILE, weights_only=True) == common
    assert not mcore_compat.write_legacy_common(tmp_path)  # already there


def test_a_foreign_class_in_the_common_state_object_is_refused_unless_allowed(tmp_path):
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.errors import CheckpointError

    _save_new_layout(tmp_path, {"args": Foreign()})
    with pytest.raises(CheckpointError, match=r"common_state object of .*allow_pickle"):
        ckpt.load_common(tmp_path)
    assert isinstance(ckpt.load_common(tmp_path, allow_pickle=True)["args"], Foreign)


def test_a_folder_with_neither_layout_has_no_common_state(tmp_path):
    assert not mcore_compat.has_common_state(tmp_path)
    assert mcore_compat.read_common(tmp_path) == {}
