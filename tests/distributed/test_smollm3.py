"""SmolLM3: Megatron logits == HF transformers logits with NoPE layers, at TP1, TP2 and PP2 (fp32, CPU, gloo).

SmolLM3 is Llama with tied embeddings whose every 4th layer applies no rotary embedding (``no_rope_layers``
in its config). Megatron-Core has the same switch (``TransformerConfig.no_rope_freq``); the tiny random
model below has 4 layers, so layer 3 is NoPE. A negative control (RoPE everywhere) shows the NoPE layer
matters for the comparison. Run with -s to see the printed differences.
"""
import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc
TOL = 1e-3
VOCAB = 300


@pytest.fixture(scope="module")
def smollm3_hf(tmp_path_factory):
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    cfg = SmolLM3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        no_rope_layer_interval=4, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    assert cfg.no_rope_layers == [1, 1, 1, 0] and cfg.tie_word_embeddings
    torch.manual_seed(0)
    model = SmolLM3ForCausalLM(cfg)
    with torch.no_grad():  # sharper attention than the 0.02-std init, so positions (RoPE or not) matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    folder = tmp_path_factory.mktemp("tiny_smollm3") / "hf"
    model.save_pretrained(str(folder))
    return str(folder)


def _worker(hf_dir: str, jobs: list[dict], ids_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pz.convert.bridge import gather_hf_state_dict, load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.forward import forward_logits
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed

    hf = HFCheckpoint(hf_dir)
    arch = ModelArch.from_hf_config(hf.config())
    ids = torch.load(ids_path)
    for job in jobs:
        par = ParallelConfig(tensor_model_parallel_size=job.get("tp", 1), pipeline_model_parallel_size=job.get("pp", 1))
        init_distributed(par)
        model = build_model(arch, ModelConfig(dtype="fp32", transformer_overrides=job.get("overrides", {})), par)
        load_hf_into_model(model, hf.get, arch)
        logits = forward_logits(model, ids, arch.vocab_size)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(logits, f"{out_dir}/logits_{job['tag']}.pt")
        state = gather_hf_state_dict(model, arch)
        if state is not None and job["tag"] == "pp2":
            torch.save(state, f"{out_dir}/hf_pp2.pt")
        dist.barrier()


def test_smollm3_nope_layers_match_hf(smollm3_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.model.arch import ModelArch

    arch = ModelArch.from_hf_config(smollm3_hf)
    assert (arch.family, arch.nope_layers, arch.tie_word_embeddings) == ("smollm3", [3], True)

    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    jobs = [dict(tag="tp1"), dict(tag="tp2", tp=2), dict(tag="pp2", pp=2),
            dict(tag="all_rope", overrides={"no_rope_freq": None})]  # negative control
    spawn_local(_worker, 2, (smollm3_hf, jobs, str(tmp_path / "ids.pt"), str(tmp_path)))

    ref_model = AutoModelForCausalLM.from_pretrained(smollm3_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(ids).logits
    for tag in ("tp1", "tp2", "pp2"):
        out = torch.load(tmp_path / f"logits_{tag}.pt")
        diff = (out - ref).abs().max().item()
        print(f"\ntiny SmolLM3 {tag}: max|megatron-hf| = {diff:.3e}")
        assert out.shape == ref.shape == (2, 19, VOCAB)
        assert diff <= TOL, tag
    wrong = (torch.load(tmp_path / "logits_all_rope.pt") - ref).abs().max().item()
    print(f"\ntiny SmolLM3 with RoPE on every layer: max|megatron-hf| = {wrong:.3e}")
    assert wrong > 10 * TOL, "the NoPE layer does not change the logits: the comparison proves nothing"

    # gathered back (PP=2 stages, tied embeddings stored once) = the HF tensors, bit for bit
    hf = HFCheckpoint(smollm3_hf)
    exported = torch.load(tmp_path / "hf_pp2.pt")
    assert sorted(exported) == sorted(hf.keys())
    assert all(torch.equal(t, hf.get(n)) for n, t in exported.items())
