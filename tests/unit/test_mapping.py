"""HF <-> Megatron layouts, checked on tensors whose every value is known."""
import pytest
import torch

from megatron_pz.convert import mapping
from megatron_pz.errors import CheckpointError
from megatron_pz.model.arch import ModelArch


def arch(**kw):
    base = dict(family="llama", num_layers=2, hidden_size=2, ffn_hidden_size=4, num_attention_heads=4,
                num_query_groups=2, head_dim=1, vocab_size=5, max_position_embeddings=16)
    base.update(kw)
    return ModelArch(**base)


def test_qkv_is_group_major_q_then_k_then_v():
    a = arch()  # 4 heads, 2 KV groups, head_dim 1 -> 2 q heads per group
    hf = {"model.layers.0.self_attn.q_proj.weight": torch.tensor([[0., 0], [1, 1], [2, 2], [3, 3]]),
          "model.layers.0.self_attn.k_proj.weight": torch.tensor([[10., 10], [11, 11]]),
          "model.layers.0.self_attn.v_proj.weight": torch.tensor([[20., 20], [21, 21]])}
    qkv = mapping.to_megatron("decoder.layers.0.self_attention.linear_qkv.weight", hf.__getitem__, a, 8)
    # group 0: q0 q1 k0 v0 | group 1: q2 q3 k1 v1
    assert qkv[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    back = mapping.to_hf("decoder.layers.0.self_attention.linear_qkv.weight", qkv, a)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    # TP=2: each rank owns one whole group
    assert mapping.shard_tp("decoder.layers.0.self_attention.linear_qkv.weight", qkv, 1, 2)[:, 0].tolist() == \
        [2, 3, 11, 21]


def test_fc1_shards_gate_and_up_separately():
    full = torch.arange(8.).reshape(8, 1)  # gate = 0..3, up = 4..7
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    assert mapping.shard_tp(name, full, 0, 2).flatten().tolist() == [0, 1, 4, 5]
    assert mapping.shard_tp(name, full, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    shards = [mapping.shard_tp(name, full, r, 2) for r in range(2)]
    assert torch.equal(mapping.unshard_tp(name, shards), full)


@pytest.mark.parametrize("name,tp", [
    ("embedding.word_embeddings.weight", 2), ("self_attention.linear_proj.weight", 2),
    ("mlp.linear_fc2.weight", 4), ("self_attention.q_layernorm.weight", 2), ("mlp.linear_fc1.weight", 4)])
def test_shard_unshard_inverse(name, tp):
    canonical = name if name.startswith("embedding") else f"decoder.layers.3.{name}"
    full = torch.randn(8, 8)
    shards = [mapping.shard_tp(canonical, full, r, tp) for r in range(tp)]
    assert torch.equal(mapping.unshard_tp(canonical, shards), full)


def test_row_parallel_splits_input_dim():
    full = torch.arange(8.).reshape(2, 4)
    s = mapping.shard_tp("decoder.layers.0.self_attention.linear_proj.weight", full, 1, 2)
    assert s.tolist() == [[2, 3], [6, 7]]


def test_vocab_padding_added_then_dropped():
    a = arch()
    emb = torch.arange(10.).reshape(5, 2)
    full = mapping.to_megatron("embedding.word_embeddings.weight", {"model.embed_tokens.weight": emb}.__getitem__, a, 8)
    assert full.shape == (8, 2) and torch.equal(full[:5], emb) and full[5:].abs().sum() == 0
    assert torch.equal(mapping.to_hf("embedding.word_embeddings.weight", full, a)["model.embed_tokens.weight"], emb)


def test_tied_output_layer_reads_embeddings_and_names_cover_hf():
    a = arch(tie_word_embeddings=True, qk_norm=True, family="qwen3")
    assert mapping.hf_sources("output_layer.weight", a) == ["model.embed_tokens.weight"]
    names = mapping.hf_names(a)
    assert "lm_head.weight" not in names and "model.layers.1.self_attn.k_norm.weight" in names
    assert len(names) == 1 + 2 * 11 + 1  # embed + 11 tensors per layer (q,k,v,o,q/k norm,2 LN,3 MLP) + norm


def test_shape_mismatch_names_the_tensor():
    a = arch()
    bad = {"model.layers.1.mlp.down_proj.weight": torch.zeros(2, 5)}
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*\(2, 5\).*\(2, 4\)"):
        mapping.to_megatron("decoder.layers.1.mlp.linear_fc2.weight", bad.__getitem__, a, 8)


def test_canonical_name_maps_local_spec_and_layer_offset():
    assert mapping.canonical_name("decoder.layers.1.input_layernorm.weight", 10) == \
        "decoder.layers.11.self_attention.linear_qkv.layer_norm_weight"
    assert mapping.canonical_name("decoder.layers.0.pre_mlp_layernorm.weight") == \
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    with pytest.raises(CheckpointError, match="no tensor-parallel layout"):
        mapping.shard_tp("decoder.layers.0.mystery.weight", torch.zeros(2), 0, 2)


# ----------------------------------------------------------------------------- MoE (Qwen3-MoE)
def moe_arch():
    return arch(family="qwen3_moe", qk_norm=True, num_experts=4, moe_ffn_hidden_size=3, moe_router_topk=2)


def test_expert_names_use_global_index_for_both_expert_implementations():
    # SequentialMLP (local spec) and TEGroupedMLP (TE spec) name local expert 1 differently; on EP rank 1 of 2
    # (offset 2) both are global expert 3. The MoE pre-MLP norm keeps its own name.
    seq = mapping.canonical_name("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", 5, 2, moe=True)
    grouped = mapping.canonical_name("decoder.layers.0.mlp.experts.linear_fc1.weight1", 5, 2, moe=True)
    assert seq == grouped == "decoder.layers.5.mlp.experts.local_experts.3.linear_fc1.weight"
    assert mapping.is_expert(seq) and mapping.expert_index(seq) == 3
    assert mapping.with_expert_index(seq, 0) == "decoder.layers.5.mlp.experts.local_experts.0.linear_fc1.weight"
    assert mapping.canonical_name("decoder.layers.0.pre_mlp_layernorm.weight", moe=True) == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert mapping.canonical_name("decoder.layers.0.mlp.router.weight", 1, 2, moe=True) == \
        "decoder.layers.1.mlp.router.weight"


def test_moe_layer_sources_and_names_cover_hf():
    a = moe_arch()
    p = "decoder.layers.1."
    assert mapping.hf_sources(p + "mlp.router.weight", a) == ["model.layers.1.mlp.gate.weight"]
    assert mapping.hf_sources(p + "pre_mlp_layernorm.weight", a) == ["model.layers.1.post_attention_layernorm.weight"]
    assert mapping.hf_sources(p + "mlp.experts.local_experts.2.linear_fc1.weight", a) == \
        ["model.layers.1.mlp.experts.2.gate_proj.weight", "model.layers.1.mlp.experts.2.up_proj.weight"]
    assert mapping.hf_sources(p + "mlp.experts.local_experts.2.linear_fc2.weight", a) == \
        ["model.layers.1.mlp.experts.2.down_proj.weight"]
    names = mapping.hf_names(a)
    # per layer: q,k,v,o, q/k norm, 2 norms, router, 4 experts x (gate, up, down) = 21; + embed, norm, lm_head
    assert len(names) == 2 * 21 + 3 and "model.layers.0.mlp.gate_proj.weight" not in names


def test_expert_fc1_is_gate_then_up_and_shards_like_dense_fc1():
    a = moe_arch()  # hidden 2, expert width 3
    gate, up, down = torch.arange(6.).reshape(3, 2), 10 + torch.arange(6.).reshape(3, 2), torch.zeros(2, 3)
    hf = {"model.layers.0.mlp.experts.3.gate_proj.weight": gate, "model.layers.0.mlp.experts.3.up_proj.weight": up,
          "model.layers.0.mlp.experts.3.down_proj.weight": down}
    name = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
    fc1 = mapping.to_megatron(name, hf.__getitem__, a, 8)
    assert torch.equal(fc1, torch.cat([gate, up]))
    back = mapping.to_hf(name, fc1, a)
    assert sorted(back) == sorted(k for k in hf if "down" not in k)
    assert all(torch.equal(t, hf[k]) for k, t in back.items())
    full = torch.arange(8.).reshape(8, 1)
    assert mapping.shard_tp(name, full, 1, 2).flatten().tolist() == [2, 3, 6, 7]  # [gate_1; up_1]
    fc2 = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight"
    assert mapping.shard_tp(fc2, torch.arange(8.).reshape(2, 4), 1, 2).tolist() == [[2, 3], [6, 7]]
    assert mapping.shard_tp("decoder.layers.0.mlp.router.weight", full, 1, 2) is full  # replicated
    bad = {**hf, "model.layers.0.mlp.experts.3.down_proj.weight": torch.zeros(2, 4)}
    with pytest.raises(CheckpointError, match=r"experts\.3\.down_proj\.weight.*\(2, 4\).*\(2, 3\)"):
        mapping.to_megatron(fc2, bad.__getitem__, a, 8)


def test_views_of_a_bucket_buffer_are_copied_before_pickling():
    """Megatron's DDP keeps parameters as views of one contiguous buffer; pickling a view writes the whole buffer.

    ``gather_hf_state_dict`` sends PP stage dicts pickled, so it copies such views first (SmolLM2 at PP2 grew to
    10 GB a rank without it)."""
    import pickle

    import torch

    from megatron_pz.convert.bridge import _is_view

    buffer = torch.zeros(100_000)
    views = {f"p{i}": buffer[i * 1000:(i + 1) * 1000] for i in range(10)}
    assert all(_is_view(v) for v in views.values())
    assert not _is_view(views["p0"].clone()) and not _is_view(torch.zeros(1000))
    big = len(pickle.dumps(views))
    small = len(pickle.dumps({k: v.clone() for k, v in views.items()}))
    assert big > 5 * small  # each view carries the 400 kB buffer; the copies carry 4 kB each
