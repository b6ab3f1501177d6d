"""MoE routing replay (R3), the pieces: the replay layout, the flip rate, micro-batch rows, SGLang's
``routed_experts`` wire format, and the embedded engine's record of a tiny Qwen3-MoE (client and server too).

The end-to-end check (bf16 engine vs fp32 Megatron trainer) is tests/distributed/test_routing_replay.py.
"""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from megatron_pz.engine.wire import generate_response_item, routed_experts_b64
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams
from megatron_pz.rollout.sglang_wire import generate_payload, parse_generate_response, parse_routed_experts
from megatron_pz.trainer.batching import build_microbatches
from megatron_pz.trainer.routing_replay import flip_rate, layer_indices
from megatron_pz.types import Sample, Status, Task

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS, EXPERTS, TOPK = 2, 8, 2


# ----------------------------------------------------------------------------- layout (pure)
def test_layer_indices_are_sequence_major_per_layer_and_sp_rank():
    # routed[b, s] = [layer 0: (10b+s, 50+10b+s), layer 1: (100+10b+s, 200+10b+s)]  (B=2, S=4, L=2, K=2)
    b_, s_ = torch.meshgrid(torch.arange(2), torch.arange(4), indexing="ij")
    base = 10 * b_ + s_
    routed = torch.stack([base, 50 + base, 100 + base, 200 + base], dim=-1).to(torch.int32)
    got = layer_indices(routed, 1, TOPK)
    # the router sees [S, B, H] flattened: row = s * B + b
    want = torch.tensor([[100 + 10 * b + s, 200 + 10 * b + s] for s in range(4) for b in range(2)])
    assert got.dtype == torch.int64 and torch.equal(got, want)
    # sequence parallelism, 2 TP ranks: rank 1 holds positions 2, 3
    assert torch.equal(layer_indices(routed, 1, TOPK, sp_rank=1, sp_size=2), want[4:])
    # unrecorded rows (-1: the last response token, padding) route to experts 0..K-1
    routed[1, 3] = -1
    assert layer_indices(routed, 0, TOPK)[3 * 2 + 1].tolist() == [0, 1]


def test_flip_rate_compares_expert_sets():
    a = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])  # 2 tokens x (2 layers x top-2)
    b = torch.tensor([[1, 0, 2, 3], [4, 6, 6, 7]])  # token 0: same sets, other order; token 1 layer 0 differs
    assert flip_rate(a, b, TOPK) == 1 / 4


def _sample(prompt, response, routed=None, gid="g0"):
    s = Sample(task=Task.MASK_PRED, group_id=gid, prompt_ids=list(prompt), response_ids=list(response),
               rollout_logprobs=[-1.0] * len(response), status=Status.COMPLETED, advantage=1.0)
    s.routed_experts = routed
    return s


def test_microbatch_carries_each_fed_tokens_routing():
    routed = np.arange(4 * 4, dtype=np.int32).reshape(4, 4)  # P=3, R=2: 4 fed tokens x (L*K=4)
    mb, = build_microbatches([_sample([1, 2, 3], [4, 5], routed)], 4, routing_width=4, seq_multiple=8)
    assert mb.routed_experts.shape == (1, 8, 4)
    assert torch.equal(mb.routed_experts[0, :4], torch.from_numpy(routed))
    assert (mb.routed_experts[0, 4:] == -1).all()  # last response token and padding: never fed to the engine
    assert build_microbatches([_sample([1, 2, 3], [4, 5], routed)], 4)[0].routed_experts is None  # replay off
    with pytest.raises(ValueError, match="sample g7 .*no routed_experts"):
        build_microbatches([_sample([1], [2], gid="g7")], 4, routing_width=4)
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected \(4, 4\)"):
        build_microbatches([_sample([1, 2, 3], [4, 5], routed[:3])], 4, routing_width=4)


# ----------------------------------------------------------------------------- wire format
def test_routed_experts_wire_round_trip_and_errors():
    routed = np.arange(5 * 6, dtype=np.int32).reshape(5, 6)
    raw = routed_experts_b64(routed)
    assert np.frombuffer(base64.b64decode(raw), dtype=np.int32).tolist() == routed.ravel().tolist()
    assert np.array_equal(parse_routed_experts(raw, prompt_len=3, response_len=3), routed)
    with pytest.raises(ValueError, match="not a whole number of rows for 4 fed tokens"):
        parse_routed_experts(raw, prompt_len=2, response_len=3)
    assert generate_payload([[1]], SamplingParams(), return_routed_experts=True)["return_routed_experts"] is True
    assert "return_routed_experts" not in generate_payload([[1]], SamplingParams())
    # a response item of the embedded server parses back into the same rows; start_len drops leading rows
    res = GenerationResult(0, [7, 8, 9], [-0.1] * 3, "length", 0, routed_experts=routed)
    item = generate_response_item(res, 3, True, None, None, routed_experts_start_len=0)
    back, = parse_generate_response([item], [[1, 2, 3]], SamplingParams(), "test")[0]
    assert np.array_equal(back.routed_experts, routed)
    late = generate_response_item(res, 3, True, None, None, routed_experts_start_len=2)["meta_info"]
    assert np.frombuffer(base64.b64decode(late["routed_experts"]), np.int32).size == 3 * 6
    assert "routed_experts" not in generate_response_item(res, 3, True, None, None)["meta_info"]


# ----------------------------------------------------------------------------- the embedded engine's record
@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=EXPERTS, num_experts_per_tok=TOPK, norm_topk_prob=True,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_moe") / "hf"
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(folder))
    return str(folder)


def _full_forward_routing(engine, ids: list[int]) -> np.ndarray:
    """The routing of one plain forward over ``ids`` (no cache, no padding), (len, L*K)."""
    from megatron_pz.engine.routing import RoutingRecorder

    with torch.no_grad(), RoutingRecorder(engine.model) as rec:
        engine.model(input_ids=torch.tensor([ids]))
    return rec.calls[0][0].reshape(len(ids), -1).numpy()


def test_engine_records_the_routing_of_every_fed_token(tiny_moe):
    from megatron_pz.engine.engine import EmbeddedEngine

    engine = EmbeddedEngine(tiny_moe)
    assert engine.is_moe
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]  # left padding; n=2 shares each prompt's prefill
    out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=1, ignore_eos=True))
    for prompt, group in zip(prompts, out):
        for r in group:
            fed = prompt + r.response_ids[:-1]
            assert r.routed_experts.shape == (len(fed), LAYERS * TOPK)
            want = _full_forward_routing(engine, fed)
            assert flip_rate(torch.from_numpy(r.routed_experts), torch.from_numpy(want), TOPK) == 0.0
    # a prompt of one token: no shared prefill
    one, = engine.generate([[3]], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))[0]
    assert np.array_equal(np.sort(one.routed_experts.reshape(-1, TOPK), -1),
                          np.sort(_full_forward_routing(engine, [3] + one.response_ids[:-1]).reshape(-1, TOPK), -1))


def test_client_gets_the_routing_from_the_server_and_a_dense_model_refuses(tiny_moe, tiny):
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.server import RolloutServer, ServerConfig
    from megatron_pz.rollout.sglang_client import BadResponse, ClientConfig, SGLangClient

    cc = ClientConfig(max_retries=0, return_routed_experts=True)
    server = RolloutServer(EmbeddedEngine(tiny_moe), ServerConfig(port=0)).start()
    try:
        r, = SGLangClient(server.url, cc).generate(
            [[5, 6, 7, 8]], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))[0]
        assert np.array_equal(r.routed_experts, server.engine.generate(
            [[5, 6, 7, 8]], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))[0][0].routed_experts)
        assert SGLangClient(server.url, ClientConfig(max_retries=0)).generate(
            [[5]], SamplingParams(max_new_tokens=2))[0][0].routed_experts is None  # not asked for
    finally:
        server.stop()
    dense = RolloutServer(EmbeddedEngine(tiny), ServerConfig(port=0)).start()
    try:
        with pytest.raises(BadResponse, match="not a mixture of experts"):
            SGLangClient(dense.url, cc).generate([[5]], SamplingParams(max_new_tokens=2))
    finally:
        dense.stop()


def test_routing_replay_config_errors():
    from megatron_pz.errors import ConfigError
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_transformer_config

    dense = ModelArch(family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=2, head_dim=16, vocab_size=300, qk_norm=True,
                      max_position_embeddings=128)
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model; qwen3 is dense"):
        build_transformer_config(dense, ModelConfig(dtype="fp32", moe_routing_replay=True))
    from megatron_pz.config import load_config

    with pytest.raises(ConfigError, match="sft_span trains on teacher-forced text"):
        load_config(None, ["model.moe_routing_replay=true", "train.objective=sft_span"])
    with pytest.raises(ConfigError, match="train.shared_prompt packs several"):
        load_config(None, ["model.moe_routing_replay=true", "train.shared_prompt=true"])
    assert not load_config(None, ["model.moe_routing_replay=true"]).shared_prompt_on(transformer_engine=False)


def _fake_chunk(recompute: str | None, layers: int = 2):
    """A model chunk as ``routing_replay`` sees it: decoder layers whose routers own Megatron's RouterReplay."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe.router_replay import RouterReplay

    routers = [SimpleNamespace(router_replay=RouterReplay(), topk=TOPK) for _ in range(layers)]
    decoder = SimpleNamespace(layers=[SimpleNamespace(layer_number=i + 1, mlp=SimpleNamespace(router=r))
                                      for i, r in enumerate(routers)])
    config = SimpleNamespace(sequence_parallel=False, recompute_granularity=recompute)
    return SimpleNamespace(decoder=decoder, config=config), routers


def test_recomputed_backward_replays_each_micro_batch_in_order():
    """With activation recomputation, Megatron reruns each layer's forward in backward, micro-batch by micro-batch
    in forward order: the routers must replay the ids of that micro-batch (REPLAY_BACKWARD pops them in order)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_pz.trainer.routing_replay import after_forward, set_replay, start_replay

    chunk, routers = _fake_chunk("full")
    mbs = [torch.randint(0, EXPERTS, (1, 3, LAYERS * TOPK), generator=torch.Generator().manual_seed(i))
           for i in range(2)]
    start_replay([chunk])
    scores = torch.randn(3, EXPERTS)
    for mb in mbs:  # two forwards (as 1F1B's warm-up runs them), then the two backward recomputations
        set_replay(chunk, mb)
        fwd, ids = routers[1].router_replay.get_replay_topk(scores, TOPK)
        assert torch.equal(ids, layer_indices(mb, 1, TOPK))
        after_forward(chunk, backward=True)
    assert routers[0].router_replay.router_replay_action == RouterReplayAction.REPLAY_BACKWARD
    for mb in mbs:
        _, ids = routers[1].router_replay.get_replay_topk(scores, TOPK)
        assert torch.equal(ids, layer_indices(mb, 1, TOPK))
    # without recomputation (or forward only) nothing is kept after the forward, and routing is the router's own
    chunk, routers = _fake_chunk(None)
    set_replay(chunk, mbs[0])
    after_forward(chunk, backward=True)
    assert routers[0].router_replay.replay_backward_list == [] and routers[0].router_replay.router_replay_action is None
    start_replay([chunk])
    set_replay(chunk, None)
    assert routers[0].router_replay.router_replay_action is None
