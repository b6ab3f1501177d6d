"""A full disk during a checkpoint save, synchronous and asynchronous: the save fails with one line naming the
folder, the error and the iteration the tracker still names; the torn folder is removed; the previous checkpoint
stays current and loads; once there is space again the same save succeeds. The disk is "full" by an injected
ENOSPC from the writes of torch's checkpoint writer (a small tmpfs needs privileges CI may not have)."""
import errno
import os
import re
from pathlib import Path

import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc


class _FullDisk:
    """While on: every file written through ``os.write``/``io`` raises ENOSPC, like a full file system."""

    def __init__(self):
        self.on = False

    def __enter__(self):
        import builtins

        self._open = builtins.open
        outer = self

        def full_open(file, mode="r", *args, **kwargs):
            if outer.on and any(c in mode for c in "wax") and "distcp" in str(file) or (
                    outer.on and any(c in mode for c in "wax") and str(file).endswith(".metadata")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return outer._open(file, mode, *args, **kwargs)

        builtins.open = full_open
        self.on = True
        return self

    def __exit__(self, *exc):
        import builtins

        builtins.open = self._open
        self.on = False


def _worker(hf_dir: str, work: str, asynchronous: bool) -> None:
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.errors import CheckpointError
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    arch = ModelArch.from_hf_config(hf_dir)
    model = build_model(arch, ModelConfig(dtype="fp32"))
    load_hf_into_model(model, HFCheckpoint(hf_dir).get, arch)
    root = Path(work) / "run"
    ckpt.save(root, 1, model, arch, meta={"step": 1})
    saves = ckpt.BackgroundSaves() if asynchronous else None
    message = None
    with _FullDisk():
        try:
            ckpt.save(root, 2, model, arch, meta={"step": 2}, background=saves)
            if saves is not None:
                saves.wait()  # the write fails in the forked writer; its error surfaces at the finalize
        except CheckpointError as exc:
            message = str(exc)
    result = {"message": message, "tracker": (root / ckpt.TRACKER).read_text().strip(),
              "leftovers": sorted(p.name for p in root.iterdir())}
    info, _ = ckpt.load(root, build_model(arch, ModelConfig(dtype="fp32")), arch)  # the previous one loads
    result["loaded"] = info.iteration
    ckpt.save(root, 2, model, arch, meta={"step": 2}, background=saves)  # space is back: the same save works
    if saves is not None:
        saves.wait()
    result["after"] = ckpt.resolve(root).iteration
    torch.save(result, Path(work) / "result.pt")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_full_disk_during_a_save_names_the_folder_and_loses_nothing(tiny_llama_hf, tmp_path, asynchronous):
    spawn_local(_worker, 1, (tiny_llama_hf, str(tmp_path), asynchronous))
    r = torch.load(tmp_path / "result.pt", weights_only=False)
    msg = r["message"]
    assert msg is not None and "\n" not in msg, msg
    assert str(tmp_path / "run" / ".iter_0000002.tmp") in msg and "No space left on device" in msg, msg
    assert msg.endswith("the tracker still names iteration 1: make room there (or fix the cause) and run the same "
                        "command again to resume"), msg
    assert r["tracker"] == "1" and r["leftovers"] == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert r["loaded"] == 1 and r["after"] == 2
