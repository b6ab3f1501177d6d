"""GPU tier (pytest -m gpu): SmolLM2 through Transformer Engine's layer spec in bf16 vs HF transformers.

bf16 logits differ from HF's by rounding; the bound is loose (0.5 on logits of magnitude ~20) and the
check that matters is argmax agreement. Run on a CUDA machine with the [gpu] extra installed.
"""
import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc]


def _te_worker(mcore_dir: str, ids_path: str, out_path: str) -> None:
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.model.forward import forward_logits
    from megatron_pz.model.provider import ModelConfig, build_model, use_transformer_engine
    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    cfg = ModelConfig(dtype="bf16", transformer_impl="auto")
    assert use_transformer_engine(cfg), "Transformer Engine is not importable on this GPU machine"
    arch = ckpt.read_arch(mcore_dir)
    model = build_model(arch, cfg)
    ckpt.load(mcore_dir, model, arch)
    logits = forward_logits(model, torch.load(ids_path).cuda(), arch.vocab_size)
    torch.save(logits.float().cpu(), out_path)


def test_smollm2_bf16_te_matches_hf(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, mcore_dir = smollm2
    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    spawn_local(_te_worker, 1, (mcore_dir, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")))
    out = torch.load(tmp_path / "out.pt")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        ref = hf(ids.cuda()).logits.float().cpu()
    diff = (out - ref).abs()
    print(f"\nSmolLM2 bf16 TE vs HF: max {diff.max():.3e} mean {diff.mean():.3e}, "
          f"argmax agreement {(out.argmax(-1) == ref.argmax(-1)).float().mean():.4f}")
    assert diff.max() < 0.5
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97
