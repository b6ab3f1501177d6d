"""Qwen3-MoE: Megatron logits == HF transformers logits under expert (and tensor) parallelism, conversion
round trips, and an EP=2 checkpoint loaded at EP=1 (fp32, CPU, gloo).

A tiny random Qwen3-MoE (2 layers, hidden 64, 4 heads / 2 KV heads, 4 experts, top-2, expert width 32,
vocab 300) stands in for Qwen3-30B-A3B. Each spawned world runs several layouts in turn to keep the
file fast (a world costs ~8 s of imports on 2 cores); run with -s to see the printed differences.
"""
import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_pz.convert.api import hf_to_mcore
from megatron_pz.convert.hf_io import HFCheckpoint
from megatron_pz.model.arch import ModelArch
from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc
TOL = 1e-3
VOCAB = 300


def save_tiny_qwen3_moe(folder, norm_topk_prob: bool, seed: int = 0) -> str:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
                         max_position_embeddings=128)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # HF initialises norms to 1; random norms make the mapping check stricter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def moe_hf(tmp_path_factory):
    """norm_topk_prob=True: Qwen3-30B-A3B's routing (top-k probabilities renormalised)."""
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_qwen3_moe") / "hf", norm_topk_prob=True)


@pytest.fixture(scope="module")
def moe_hf_unnormalised(tmp_path_factory):
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_qwen3_moe_raw") / "hf", norm_topk_prob=False, seed=1)


def hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- workers (module level)
def _logits_worker(jobs: list[dict], ids_path: str, out_dir: str, to_hf: tuple[str, str] | None = None) -> None:
    """For each job: init the layout, build the model, load HF or a checkpoint, save logits (and HF tensors).

    job keys: tag, source, tp, ep, etp, dispatcher, overrides, export (gather the HF state dict too).
    ``to_hf``: (checkpoint, folder) exported with ``mcore_to_hf`` afterwards, in this world.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pz import checkpoint as ckpt
    from megatron_pz.convert.bridge import gather_hf_state_dict, load_hf_into_model
    from megatron_pz.model.forward import forward_logits
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed

    ids = torch.load(ids_path)
    for job in jobs:
        par = ParallelConfig(tensor_model_parallel_size=job.get("tp", 1),
                             expert_model_parallel_size=job.get("ep", 1),
                             expert_tensor_parallel_size=job.get("etp"))
        init_distributed(par)
        mcfg = ModelConfig(dtype="fp32", moe_token_dispatcher=job.get("dispatcher", "alltoall"),
                           transformer_overrides=job.get("overrides", {}))
        source = job["source"]
        if ckpt.is_megatron_checkpoint(source):
            arch = ckpt.read_arch(source)
            model = build_model(arch, mcfg, par, training=False)
            ckpt.load(source, model, arch)
        else:
            hf = HFCheckpoint(source)
            arch = ModelArch.from_hf_config(hf.config())
            # training=False: TP > 1 without sequence parallelism (the local spec's torch RMSNorm cannot do
            # it), which Megatron's MoE layer allows for forward-only use.
            model = build_model(arch, mcfg, par, training=False)
            load_hf_into_model(model, hf.get, arch)
        logits = forward_logits(model, ids, arch.vocab_size)
        if dist.get_rank() == 0:
            torch.save(logits, f"{out_dir}/logits_{job['tag']}.pt")
        if job.get("export"):
            state = gather_hf_state_dict(model, arch)
            if state is not None:
                torch.save(state, f"{out_dir}/hf_{job['tag']}.pt")
        # Every EP rank must have got the experts it owns: local expert l of EP rank r = global r*E/EP + l.
        if par.expert_model_parallel_size > 1:
            expert0 = model[0].decoder.layers[0].mlp.experts.local_experts[0].linear_fc2.weight
            first = ps.get_expert_model_parallel_rank() * 4 // par.expert_model_parallel_size
            want = HFCheckpoint(job["source"]).get(f"model.layers.0.mlp.experts.{first}.down_proj.weight")
            assert torch.equal(expert0, want), "EP rank holds the wrong expert"
        dist.barrier()
    if to_hf is not None:
        from megatron_pz.convert.api import mcore_to_hf

        mcore_to_hf(*to_hf)


def run_jobs(tmp_path, world, jobs, ids, to_hf=None):
    torch.save(ids, tmp_path / "ids.pt")
    spawn_local(_logits_worker, world, (jobs, str(tmp_path / "ids.pt"), str(tmp_path), to_hf))
    return {j["tag"]: torch.load(tmp_path / f"logits_{j['tag']}.pt") for j in jobs}


# ----------------------------------------------------------------------------- tests
def test_expert_and_tensor_parallel_logits_match_hf(moe_hf, tmp_path):
    """World of 2: EP=2 with both token dispatchers, TP=2 (experts split over TP), TP=2 x EP=2 with ETP=1."""
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(moe_hf, ids)
    jobs = [dict(tag="ep2_alltoall", source=moe_hf, ep=2, dispatcher="alltoall", export=True),
            dict(tag="ep2_allgather", source=moe_hf, ep=2, dispatcher="allgather"),
            dict(tag="tp2_etp2", source=moe_hf, tp=2, export=True),
            dict(tag="tp2_ep2_etp1", source=moe_hf, tp=2, ep=2, etp=1, export=True)]
    out = run_jobs(tmp_path, 2, jobs, ids)
    for tag, logits in out.items():
        diff = (logits - ref).abs().max().item()
        print(f"\ntiny Qwen3-MoE {tag}: max|megatron-hf| = {diff:.3e}")
        assert logits.shape == ref.shape == (2, 19, VOCAB)
        assert diff <= TOL, tag
    # gathering across EP, TP and expert-TP gives back exactly the HF tensors, every expert once
    hf = HFCheckpoint(moe_hf)
    for tag in ("ep2_alltoall", "tp2_etp2", "tp2_ep2_etp1"):
        exported = torch.load(tmp_path / f"hf_{tag}.pt")
        assert sorted(exported) == sorted(hf.keys()), tag
        assert all(torch.equal(t, hf.get(n)) for n, t in exported.items()), tag


def test_hf_to_mcore_at_ep2_and_back_is_bit_exact_and_loads_at_ep1(moe_hf, moe_hf_unnormalised, tmp_path):
    """HF -> Megatron (saved at EP=2) -> HF, loaded at EP=1; logits at EP=1 for both routing variants."""
    mcore = hf_to_mcore(moe_hf, tmp_path / "mcore_ep2", ep=2)
    meta = json.loads((mcore / "iter_0000000" / "megatron_pz.json").read_text())
    assert meta["arch"]["num_experts"] == 4 and meta["arch"]["moe_norm_topk_prob"] is True
    # Megatron-LM's MoE keys (as the TE spec writes them): experts stacked over the global expert axis,
    # which is what lets an EP=2 save load at EP=1; the MoE pre-MLP norm keeps its own key.
    md = FileSystemReader(str(mcore / "iter_0000000")).read_metadata().state_dict_metadata
    assert tuple(md["decoder.layers.mlp.experts.experts.linear_fc1.weight"].size) == (2, 4, 64, 64)
    assert tuple(md["decoder.layers.mlp.experts.experts.linear_fc2.weight"].size) == (2, 4, 64, 32)
    assert tuple(md["decoder.layers.mlp.router.weight"].size) == (2, 4, 64)
    assert "decoder.layers.pre_mlp_layernorm.weight" in md
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in md

    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    jobs = [dict(tag="ckpt_ep1", source=str(mcore)), dict(tag="hf_ep1", source=moe_hf),
            dict(tag="raw_ep1", source=moe_hf_unnormalised),
            # negative control: the other Megatron softmax placement must NOT match HF's routing
            dict(tag="raw_wrong_router", source=moe_hf_unnormalised,
                 overrides={"moe_router_pre_softmax": False})]
    # world of 1: the EP=2 checkpoint loads at EP=1, for the logits and for the export back to HF
    out = run_jobs(tmp_path, 1, jobs, ids, to_hf=(str(mcore), str(tmp_path / "hf_back")))

    assert torch.equal(out["ckpt_ep1"], out["hf_ep1"])  # saved at EP=2, loaded at EP=1: identical
    for tag, src in (("hf_ep1", moe_hf), ("raw_ep1", moe_hf_unnormalised)):
        diff = (out[tag] - hf_logits(src, ids)).abs().max().item()
        print(f"\ntiny Qwen3-MoE {tag} (norm_topk_prob={src == moe_hf}): max|megatron-hf| = {diff:.3e}")
        assert diff <= TOL
    wrong = (out["raw_wrong_router"] - hf_logits(moe_hf_unnormalised, ids)).abs().max().item()
    print(f"\ntiny Qwen3-MoE with the other softmax placement: max|megatron-hf| = {wrong:.3e}")
    assert wrong > 10 * TOL, f"routing variants indistinguishable ({wrong:.2e}): the check proves nothing"

    # bit-exact tensors, nothing more, nothing less; the config describes the same architecture
    src, back = HFCheckpoint(moe_hf), HFCheckpoint(tmp_path / "hf_back")
    assert sorted(back.keys()) == sorted(src.keys())
    assert all(torch.equal(back.get(n), src.get(n)) for n in src.keys())
    arch, arch_back = ModelArch.from_hf_config(src.config()), ModelArch.from_hf_config(back.config())
    assert arch_back.to_dict() | {"hf_config": {}} == arch.to_dict() | {"hf_config": {}}
    assert torch.equal(hf_logits(tmp_path / "hf_back", ids), hf_logits(moe_hf, ids))  # transformers reads it
