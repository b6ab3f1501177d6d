"""MoE routing replay (R3) on a tiny Qwen3-MoE: a bf16 rollout engine routes some tokens to other experts than the
fp32 Megatron trainer; replaying the engine's routing in the trainer's forward brings the trainer's log-probs
closer to the engine's. Run with -s to see the figures (docs/training.md, "MoE routing replay").

The embedded engine records the experts of every fed token (prefill, shared prefill and decode steps); the fp32
engine's record equals Megatron's own fp32 routing (so the layout is right), and replaying the trainer's own
routing changes nothing.
"""
import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]  # 60-120 s on 2 shared cores (20 s of CPU)
TEMPERATURE = 1.0
LAYERS, EXPERTS, TOPK = 4, 32, 4  # more, closer experts than test_moe's 4 / top-2: routing near ties, as at scale


def save_tiny_moe(folder) -> str:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                         num_experts=EXPERTS, num_experts_per_tok=TOPK, norm_topk_prob=True,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(folder))
    return str(folder)


def _trainer_worker(hf_dir: str, samples_path: str, out_path: str) -> None:
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.routing_replay import replayed_routers
    from megatron_pz.trainer.step import forward_logprobs

    torch.set_num_threads(1)
    par = ParallelConfig()
    init_distributed(par)
    hf = HFCheckpoint(hf_dir)
    arch = ModelArch.from_hf_config(hf.config())
    model = build_model(arch, ModelConfig(dtype="fp32", moe_routing_replay=True), par)
    load_hf_into_model(model, hf.get, arch)
    width = arch.num_layers * arch.moe_router_topk
    data = torch.load(samples_path, weights_only=False)
    out = {}
    for tag, samples in data.items():
        mbs = build_microbatches(samples, micro_batch_size=len(samples), routing_width=width)
        assert len(mbs) == 1
        mb = mbs[0]
        # The trainer's own routing: Megatron's RECORD action, one forward without replay.
        routers = replayed_routers(model[0])
        for _, r in routers:
            r.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
        plain = build_microbatches(samples, micro_batch_size=len(samples))
        free = forward_logprobs(model, plain, arch.vocab_size, TEMPERATURE)[0]
        b, s = mb.tokens.shape
        own = torch.cat([r.router_replay.get_recorded_indices().reshape(s, b, -1).transpose(0, 1)
                         for _, r in routers], dim=-1).to(torch.int32)  # [B, S, L*K]
        for _, r in routers:
            r.router_replay.clear_router_replay_action()
        replayed = forward_logprobs(model, mbs, arch.vocab_size, TEMPERATURE)[0]
        mb_own = build_microbatches(samples, micro_batch_size=len(samples), routing_width=width)[0]
        mb_own.routed_experts = own
        self_replayed = forward_logprobs(model, [mb_own], arch.vocab_size, TEMPERATURE)[0]
        mask = mb.loss_mask > 0
        out[tag] = dict(engine=mb.routed_experts, own=own, fed=mb.routed_experts[:, :, 0] >= 0,
                        free=(free - mb.rollout_logprobs)[mask].abs(),
                        replay=(replayed - mb.rollout_logprobs)[mask].abs(),
                        self_replay=(self_replayed - free)[mask].abs())
    torch.save(out, out_path)


def _engine_samples(hf_dir: str, dtype: str) -> list:
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.rollout.protocol import SamplingParams, fill_sample
    from megatron_pz.types import Sample, Status, Task

    engine = EmbeddedEngine(hf_dir, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    # prompts of different lengths (left padding), n=2 (shared prefill), sampled at T=1 with seeds
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 9, 14, 20)]
    results = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=24, temperature=TEMPERATURE, seed=0,
                                                      ignore_eos=True))
    samples = []
    for i, (ids, group) in enumerate(zip(prompts, results)):
        for r in group:
            s = fill_sample(Sample(task=Task.MASK_PRED, group_id=f"p{i}", prompt_ids=list(ids)), r)
            s.status, s.advantage = Status.COMPLETED, 0.0
            assert s.routed_experts.shape == (len(ids) + len(r.response_ids) - 1, LAYERS * TOPK)
            samples.append(s)
    return samples


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    hf_dir = save_tiny_moe(tmp / "hf")
    torch.save({"fp32": _engine_samples(hf_dir, "float32"), "bf16": _engine_samples(hf_dir, "bf16")},
               tmp / "samples.pt")
    spawn_local(_trainer_worker, 1, (hf_dir, str(tmp / "samples.pt"), str(tmp / "out.pt")))
    return torch.load(tmp / "out.pt")


def _flip_rate(f: dict) -> float:
    from megatron_pz.trainer.routing_replay import flip_rate

    fed = f["fed"]
    return flip_rate(f["engine"][fed], f["own"][fed], topk=TOPK)


def test_fp32_engine_records_the_trainers_routing(figures):
    f = figures["fp32"]
    print(f"\ntiny Qwen3-MoE fp32 engine vs fp32 trainer: flip rate {_flip_rate(f):.4f}; |dlogp| mean "
          f"{f['free'].mean():.2e} without replay, {f['replay'].mean():.2e} with")
    assert _flip_rate(f) == 0.0  # every fed token's row lines up with the trainer's position
    assert torch.equal(f["free"], f["replay"])  # replaying identical routing is a no-op


def test_bf16_engine_routing_replay_reduces_mismatch(figures):
    f = figures["bf16"]
    rate = _flip_rate(f)
    print(f"\ntiny Qwen3-MoE bf16 engine vs fp32 trainer: flip rate {rate:.4f} of {int(f['fed'].sum()) * LAYERS} "
          f"token-layer routings; |dlogp| over {f['free'].numel()} response tokens: mean {f['free'].mean():.3e} / "
          f"max {f['free'].max():.3e} without replay, mean {f['replay'].mean():.3e} / max {f['replay'].max():.3e} "
          f"with replay")
    assert rate > 0, "bf16 routed exactly like fp32: this check proves nothing"
    assert f["replay"].mean() < f["free"].mean()
    assert f["self_replay"].max() == 0  # the trainer replaying its own routing computes the same log-probs
