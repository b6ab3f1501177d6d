"""The real ``megatron-pz convert`` entry point: bit-exact round trips and one-line errors for bad input."""
import json
import subprocess
import sys

import pytest
import torch

from megatron_pz.convert.hf_io import HFCheckpoint

pytestmark = pytest.mark.multiproc


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "megatron_pz.cli", "convert", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"convert failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def assert_same_tensors(a_dir, b_dir):
    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        ta, tb = a.get(k), b.get(k)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


def test_roundtrip_hf_mcore_tp2_hf_is_bit_exact(tiny_qwen3_hf, tmp_path):
    cli("--from", "hf", "--to", "mcore", tiny_qwen3_hf, tmp_path / "mc", "--tp", "2")
    assert (tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    cli("--from", "mcore", "--to", "hf", tmp_path / "mc", tmp_path / "hf2")
    assert_same_tensors(tiny_qwen3_hf, tmp_path / "hf2")
    cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["vocab_size"] == 300  # padding never exported


def test_roundtrip_pp2_bf16(tiny_llama_hf, tmp_path):
    """Tied embeddings across pipeline stages, and a bf16 save: still every tensor bit for bit (in bf16)."""
    from megatron_pz.convert.hf_io import save_hf_folder

    src = HFCheckpoint(tiny_llama_hf)
    bf16_dir = tmp_path / "bf16"
    save_hf_folder(bf16_dir, [(k, src.get(k).to(torch.bfloat16)) for k in src.keys()], src.config())
    cli("--from", "hf", "--to", "mcore", bf16_dir, tmp_path / "mc", "--pp", "2")
    cli("--from", "mcore", "--to", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(bf16_dir, tmp_path / "back")


def test_smollm2_roundtrip_is_bit_exact(smollm2, tmp_path):
    hf_dir, mcore_dir = smollm2
    cli("--from", "mcore", "--to", "hf", mcore_dir, tmp_path / "hf")
    assert_same_tensors(hf_dir, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").exists()  # the tokenizer travels with the checkpoint


def test_bad_inputs_give_one_line_errors(tiny_qwen3_hf, tmp_path):
    import shutil

    # unsupported architecture
    bad = tmp_path / "mistral"
    shutil.copytree(tiny_qwen3_hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    p = cli("--from", "hf", "--to", "mcore", bad, tmp_path / "x", check=False)
    assert p.returncode == 2 and "unsupported architecture: model_type='mistral'" in p.stderr
    assert "Traceback" not in p.stderr
    # wrong TP for the head count (4 heads, 2 KV heads -> TP=4 impossible)
    p = cli("--from", "hf", "--to", "mcore", tiny_qwen3_hf, tmp_path / "y", "--tp", "4", check=False)
    assert p.returncode == 2 and "num_query_groups (num_key_value_heads)=2 is not divisible" in p.stderr
    # a weight of the wrong shape
    from safetensors.torch import load_file, save_file

    shp = tmp_path / "shape"
    shutil.copytree(tiny_qwen3_hf, shp)
    sd = load_file(str(shp / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(sd, str(shp / "model.safetensors"))
    p = cli("--from", "hf", "--to", "mcore", shp, tmp_path / "z", check=False)
    assert p.returncode == 2 and "model.layers.1.mlp.down_proj.weight" in p.stderr and "(64, 95)" in p.stderr
    # a missing tensor
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(shp / "model.safetensors"))
    p = cli("--from", "hf", "--to", "mcore", shp, tmp_path / "w", check=False)
    assert p.returncode == 2 and "model.layers.1.mlp.down_proj.weight" in p.stderr
    # not a checkpoint at all
    p = cli("--from", "mcore", "--to", "hf", tmp_path, tmp_path / "v", check=False)
    assert p.returncode == 2 and "not a Megatron checkpoint" in p.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "v").exists()  # nothing half-written
