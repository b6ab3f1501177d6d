"""Megatron logits == HF transformers logits at several TP/PP layouts, over gloo on CPU (fp32).

Each layout runs in a freshly spawned process group. The max abs difference is printed (run with -s to
see it) and bounded by 1e-3, the foundation issue's tolerance.
"""
import pytest
import torch

from megatron_pz.convert.api import hf_to_mcore
from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc
TOL = 1e-3


def _logits_worker(source: str, tp: int, pp: int, ids_path: str, out_path: str) -> None:
    """Build the model at TP x PP, load ``source`` (HF folder or Megatron checkpoint), save logits."""
    from megatron.core import parallel_state as ps

    from megatron_pz import checkpoint as ckpt
    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.forward import forward_logits
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed

    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(par)
    if ckpt.is_megatron_checkpoint(source):
        arch = ckpt.read_arch(source)
        model = build_model(arch, ModelConfig(dtype="fp32"), par)
        ckpt.load(source, model, arch)
    else:
        hf = HFCheckpoint(source)
        arch = ModelArch.from_hf_config(hf.config())
        model = build_model(arch, ModelConfig(dtype="fp32"), par)
        load_hf_into_model(model, hf.get, arch)
    logits = forward_logits(model, torch.load(ids_path), arch.vocab_size)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, out_path)


def megatron_logits(tmp_path, source, ids, tp=1, pp=1, tag="x"):
    ids_path, out_path = tmp_path / f"ids_{tag}.pt", tmp_path / f"logits_{tag}.pt"
    torch.save(ids, ids_path)
    spawn_local(_logits_worker, tp * pp, (str(source), tp, pp, str(ids_path), str(out_path)))
    return torch.load(out_path)


def hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def qwen3_tp2_ckpt(tiny_qwen3_hf, tmp_path_factory):
    """The tiny Qwen3 converted at TP=2 (vocab 300 padded to 512 there, 384 at TP=1)."""
    dst = tmp_path_factory.mktemp("qwen3_tp2") / "mcore"
    hf_to_mcore(tiny_qwen3_hf, dst, tp=2)
    return dst


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_tiny_qwen3_logits_match_hf(tiny_qwen3_hf, qwen3_tp2_ckpt, tmp_path, tp, pp):
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(tiny_qwen3_hf, ids)
    out = megatron_logits(tmp_path, qwen3_tp2_ckpt, ids, tp, pp)
    diff = (out - ref).abs().max().item()
    print(f"\ntiny-qwen3 TP{tp}/PP{pp}: max|megatron-hf| = {diff:.3e}")
    assert out.shape == ref.shape == (2, 19, 300)  # padded vocab rows never surface
    assert diff <= TOL


def test_saved_at_tp2_loaded_at_tp1_gives_identical_logits(tiny_qwen3_hf, qwen3_tp2_ckpt, tmp_path):
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(2))
    from_ckpt = megatron_logits(tmp_path, qwen3_tp2_ckpt, ids, 1, 1, tag="ckpt")
    from_hf = megatron_logits(tmp_path, tiny_qwen3_hf, ids, 1, 1, tag="hf")
    assert torch.equal(from_ckpt, from_hf)


@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 1), (1, 2)])
def test_smollm2_logits_match_hf(smollm2, tmp_path, tp, pp):
    """SmolLM2-135M has 9 heads / 3 KV heads: TP=3 is its smallest valid TP>1 (TP=2 is rejected)."""
    from transformers import AutoTokenizer

    hf_dir, mcore_dir = smollm2
    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = ["The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in",
             "In mathematics, a prime number is a natural number greater than 1 that"]
    enc = [tok.encode(t) for t in texts]
    n = min(len(e) for e in enc)
    ids = torch.tensor([e[:n] for e in enc])
    ref = hf_logits(hf_dir, ids)
    out = megatron_logits(tmp_path, mcore_dir, ids, tp, pp)
    diff = (out - ref).abs().max().item()
    print(f"\nSmolLM2-135M TP{tp}/PP{pp}: max|megatron-hf| = {diff:.3e} over {tuple(out.shape)}")
    assert diff <= TOL
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
