"""The colocated embedded engine (``rollout.colocate``) on a tiny Llama at world size 1: its parameters are the
Megatron model's own storage, and it computes what the disaggregated engine computes from the exported weights.

One spawned process (Megatron needs a process group): Megatron model + DDP + distributed optimizer, a colocated
engine bound to it (``convert.bridge.share_hf_params``), and a disaggregated engine loaded from an HF folder of
the same weights (what the disk sync writes). Untied output layer, 4 heads in 2 KV groups (so q/k/v are copies),
vocab 300 padded to 384 by Megatron.
"""
import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc
PROMPTS = [[5, 17, 42, 99, 7], [250, 3, 3, 180, 64, 11, 2]]


def _prompt_logprobs(engine) -> torch.Tensor:
    """Every prompt token's log-prob and the top-5 of every position, flattened (fp32)."""
    vals = []
    for p in engine.prompt_logprobs(PROMPTS, top_k=5):
        vals += [lp for lp in p.token_logprobs if lp is not None]
        vals += [lp for row in p.top[1:] for lp, _ in row]
    return torch.tensor(vals)


def _sampled(engine):
    from megatron_pz.rollout.protocol import SamplingParams

    res = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True))
    return [(r.response_ids, r.logprobs) for group in res for r in group]


def _worker(hf_dir: str, out_path: str) -> None:
    from megatron_pz.config import OptimConfig
    from megatron_pz.convert.bridge import gather_hf_state_dict, load_hf_into_model, share_hf_params
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.model import build_model as build_hf
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model, unwrap
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.rollout.protocol import fill_sample
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.optimizer import setup_training
    from megatron_pz.trainer.step import train_step
    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.types import Sample, Status, Task

    torch.set_num_threads(1)
    init_distributed(ParallelConfig())
    arch = ModelArch.from_hf_config(hf_dir)
    chunks = build_model(arch, ModelConfig(dtype="fp32"), ParallelConfig())
    load_hf_into_model(chunks, HFCheckpoint(hf_dir).get, arch)
    state = setup_training(chunks, OptimConfig(lr=1e-2, lr_warmup_steps=0, use_distributed_optimizer=True), 2)
    state.optimizer.reload_model_params()
    mega = dict(unwrap(state.model[0]).named_parameters())
    out = {}

    lm = build_hf(hf_dir, "float32")
    colocated = EmbeddedEngine(hf_dir, loaded=lm)
    refresh = lambda: share_hf_params(lm.model, chunks, arch)  # noqa: E731
    bound = refresh()
    disaggregated = EmbeddedEngine(hf_dir, dtype="float32")  # the exported weights, its own copy
    hf = dict(lm.model.named_parameters())
    out["shared"], out["copied"] = sorted(bound.shared), sorted(bound.copied)
    out["shared_bytes"], out["copied_bytes"] = bound.shared_bytes, bound.copied_bytes
    # data_ptr of each shared HF tensor against the Megatron parameter it must live in
    emb, fc1 = mega["embedding.word_embeddings.weight"], mega["decoder.layers.0.mlp.linear_fc1.weight"]
    h = arch.hidden_size
    out["ptrs"] = {
        "embed": (hf["model.embed_tokens.weight"].data_ptr(), emb.data_ptr()),
        "lm_head": (hf["lm_head.weight"].data_ptr(), mega["output_layer.weight"].data_ptr()),
        "gate": (hf["model.layers.0.mlp.gate_proj.weight"].data_ptr(), fc1.data_ptr()),
        "up": (hf["model.layers.0.mlp.up_proj.weight"].data_ptr(),
               fc1.data_ptr() + arch.ffn_hidden_size * h * fc1.element_size()),
        "down": (hf["model.layers.0.mlp.down_proj.weight"].data_ptr(),
                 mega["decoder.layers.0.mlp.linear_fc2.weight"].data_ptr()),
        "o": (hf["model.layers.0.self_attn.o_proj.weight"].data_ptr(),
              mega["decoder.layers.0.self_attention.linear_proj.weight"].data_ptr()),
    }
    qkv = mega["decoder.layers.0.self_attention.linear_qkv.weight"]
    out["q_outside_qkv"] = not (qkv.data_ptr() <= hf["model.layers.0.self_attn.q_proj.weight"].data_ptr()
                                < qkv.data_ptr() + qkv.numel() * qkv.element_size())

    # step 0: the same numbers from both engines
    out["step0"] = (_prompt_logprobs(colocated), _prompt_logprobs(disaggregated))
    out["sampled0"] = (_sampled(colocated), _sampled(disaggregated))

    # a Megatron parameter changed in place shows in the colocated engine at once (no refresh, no copy)
    with torch.no_grad():
        row = emb[PROMPTS[0][2]].clone()
        emb[PROMPTS[0][2]] += 0.5
        out["mutated"] = _prompt_logprobs(colocated)
        emb[PROMPTS[0][2]] = row
    out["restored"] = _prompt_logprobs(colocated)

    # one real optimizer step (GRPO loss on the engine's own samples, advantages +-1)
    samples = []
    for i, (ids, group) in enumerate(zip(PROMPTS, colocated.generate(PROMPTS, _params()))):
        for j, r in enumerate(group):
            s = fill_sample(Sample(task=Task.MASK_PRED, group_id=f"g{i}", prompt_ids=list(ids)), r)
            s.status, s.advantage = Status.COMPLETED, 1.0 if j == 0 else -1.0
            samples.append(s)
    ptrs_before = {n: hf[n].data_ptr() for n in bound.shared}
    metrics = train_step(state, build_microbatches(samples, micro_batch_size=4), LossConfig(), arch.vocab_size, 1.0)
    out["step_metrics"] = metrics
    bound = colocated.update_weights_in_place(1, refresh)
    out["ptrs_moved"] = [n for n in bound.shared if hf[n].data_ptr() != ptrs_before[n]]
    disaggregated.swap_weights(gather_hf_state_dict(chunks, arch), 1, source="export after step 1")
    out["step1"] = (_prompt_logprobs(colocated), _prompt_logprobs(disaggregated))
    out["sampled1"] = (_sampled(colocated), _sampled(disaggregated))
    torch.save(out, out_path)


def _params():
    from megatron_pz.rollout.protocol import SamplingParams

    return SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def colocated_run(tmp_path_factory):
    from conftest import save_tiny_hf

    d = tmp_path_factory.mktemp("colocate")
    hf_dir = save_tiny_hf(d / "hf", "llama", tie_word_embeddings=False)
    out = d / "out.pt"
    spawn_local(_worker, 1, (hf_dir, str(out)))
    return torch.load(out, weights_only=False)


def test_every_tensor_but_qkv_is_a_view_of_the_megatron_parameters(colocated_run):
    r = colocated_run
    assert all(name.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for name in r["copied"]), r["copied"]
    assert len(r["copied"]) == 3 * 2  # 2 layers
    assert "model.embed_tokens.weight" in r["shared"] and "lm_head.weight" in r["shared"]
    # q/k/v: [H*d + 2*G*d, h] = [(4 + 2*2) * 16, 64] fp32 per layer
    assert r["copied_bytes"] == 2 * (4 + 2 * 2) * 16 * 64 * 4
    for what, (hf_ptr, megatron_ptr) in r["ptrs"].items():
        assert hf_ptr == megatron_ptr, what
    assert r["q_outside_qkv"]


def test_colocated_logprobs_equal_the_disaggregated_engine_at_step_0(colocated_run):
    colocated, disaggregated = colocated_run["step0"]
    assert torch.equal(colocated, disaggregated)
    assert colocated_run["sampled0"][0] == colocated_run["sampled0"][1]


def test_a_megatron_parameter_changed_in_place_changes_the_engine(colocated_run):
    base = colocated_run["step0"][0]
    assert (colocated_run["mutated"] - base).abs().max() > 1e-3
    assert torch.equal(colocated_run["restored"], base)


def test_after_an_optimizer_step_the_engine_serves_the_new_weights(colocated_run):
    r = colocated_run
    assert r["step_metrics"]["train/update_skipped"] == 0 and r["step_metrics"]["train/grad_norm"] > 0
    assert r["ptrs_moved"] == []  # the optimizer wrote into the storage the views read
    colocated, disaggregated = r["step1"]
    assert (colocated - r["step0"][0]).abs().max() > 1e-4  # the step moved the weights
    assert torch.allclose(colocated, disaggregated, atol=1e-6, rtol=0)
    assert r["sampled1"][0] == r["sampled1"][1]
