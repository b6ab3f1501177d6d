"""Megatron checkpoints: atomic saves, Megatron-LM compatibility, and clear errors for bad files.

Checks run inside a spawned single-rank world so Megatron's global state stays out of the test process;
a failing check re-raises here with its traceback.
"""
import shutil
from pathlib import Path

import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc


def _build(arch, dtype="fp32"):
    from megatron_pz.model.provider import ModelConfig, build_model

    return build_model(arch, ModelConfig(dtype=dtype))


def _robustness_worker(hf_dir: str, work: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_pz import checkpoint as ckpt
    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.errors import CheckpointError
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    work = Path(work)
    hf = HFCheckpoint(hf_dir)
    arch = ModelArch.from_hf_config(hf.config())
    model = _build(arch)
    load_hf_into_model(model, hf.get, arch)
    root = work / "run"
    ckpt.save(root, 1, model, arch, meta={"step": 1})
    reference = {k: v.clone() for k, v in model[0].state_dict().items() if torch.is_tensor(v)}

    # 1. A save interrupted half-way (crash inside dist_checkpointing.save) leaves iteration 1 current.
    real_save = dist_checkpointing.save

    def crashing_save(state, directory, *a, **k):
        (Path(directory) / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    dist_checkpointing.save = crashing_save
    try:
        ckpt.save(root, 2, model, arch)
        raise AssertionError("the crashing save did not raise")
    except KeyboardInterrupt:
        pass
    finally:
        dist_checkpointing.save = real_save
    assert (root / ckpt.TRACKER).read_text().strip() == "1"
    assert not (root / "iter_0000002").exists()
    fresh = _build(arch)
    info, _ = ckpt.load(root, fresh, arch)
    assert info.iteration == 1 and info.meta["step"] == 1
    for k, v in fresh[0].state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, reference[k]), k
    # ...and the next save of iteration 2 cleans the leftover temp folder and succeeds.
    ckpt.save(root, 2, model, arch)
    assert ckpt.resolve(root).iteration == 2 and not list(root.glob(".iter_*"))

    # 2. Truncated and missing shard files are named.
    bad = work / "truncated"
    shutil.copytree(root, bad)
    shard = sorted((bad / "iter_0000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    try:
        ckpt.load(bad, _build(arch), arch)
        raise AssertionError("truncated shard loaded")
    except CheckpointError as exc:
        assert shard.name in str(exc) and "truncated" in str(exc), exc
    shard.unlink()
    try:
        ckpt.load(bad, _build(arch), arch)
        raise AssertionError("missing shard loaded")
    except CheckpointError as exc:
        assert shard.name in str(exc) and "missing" in str(exc), exc

    # 3. A model of another shape: the error names the tensor.
    wider = ModelArch.from_dict({**arch.to_dict(), "ffn_hidden_size": arch.ffn_hidden_size * 2})
    try:
        ckpt.load(root, _build(wider), wider)
        raise AssertionError("shape mismatch loaded")
    except CheckpointError as exc:
        assert "decoder.layers.mlp.linear_fc1" in str(exc) or "linear_fc2" in str(exc), exc

    # 4. A Megatron-LM checkpoint (no megatron_pz.json): the architecture comes from common.pt's args.
    mlm = work / "megatron_lm"
    shutil.copytree(root, mlm)
    (mlm / "iter_0000002" / ckpt.META).unlink()
    from_args = ckpt.read_arch(mlm, vocab_size=arch.vocab_size)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "head_dim", "vocab_size", "tie_word_embeddings", "qk_norm", "qkv_bias"):
        assert getattr(from_args, field) == getattr(arch, field), field
    ckpt.load(mlm, _build(from_args), from_args)

    # 5. A garbage tracker file is named.
    (mlm / ckpt.TRACKER).write_text("not-a-number")
    try:
        ckpt.resolve(mlm)
        raise AssertionError("garbage tracker accepted")
    except CheckpointError as exc:
        assert ckpt.TRACKER in str(exc)

    # 6. fp32 checkpoint into a bf16 model (the GPU default): values are cast, not refused.
    bf16 = _build(arch, "bf16")
    ckpt.load(root, bf16, arch)
    emb = bf16[0].embedding.word_embeddings.weight
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, model[0].embedding.word_embeddings.weight.to(torch.bfloat16))

    # 7. publish_now=False (a trainer's step save, published after the step's log lines): written whole but not
    # named, so a kill now resumes from iteration 2; publish() renames it into place and moves the tracker.
    ckpt.save(root, 3, model, arch, meta={"step": 3}, publish_now=False, keep_last=1)
    assert ckpt.resolve(root).iteration == 2 and (root / ".iter_0000003.tmp" / ckpt.META).is_file()
    assert ckpt.load(root, _build(arch), arch)[0].iteration == 2
    ckpt.publish(root, 3, keep_last=1)
    assert ckpt.resolve(root).iteration == 3 and not list(root.glob(".iter_*"))
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000003"]  # keep_last applied at publish
    try:
        ckpt.publish(root, 4)
        raise AssertionError("published a checkpoint that was never written")
    except CheckpointError as exc:
        assert ".iter_0000004.tmp" in str(exc), exc


def test_checkpoint_robustness(tiny_llama_hf, tmp_path):
    spawn_local(_robustness_worker, 1, (tiny_llama_hf, str(tmp_path)))


class Foreign:  # a class on no weights_only allow-list
    pass


def test_common_pt_with_foreign_pickle_is_refused_unless_allowed(tmp_path):
    """common.pt is read with weights_only=True; an unknown class is refused with the file named."""
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.errors import CheckpointError

    it = tmp_path / "iter_0000003"
    it.mkdir()
    torch.save({"args": Foreign()}, it / "common.pt")
    with pytest.raises(CheckpointError, match=r"common\.pt.*allow_pickle"):
        ckpt.load_common(it)
    assert isinstance(ckpt.load_common(it, allow_pickle=True)["args"], Foreign)
