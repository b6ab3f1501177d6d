"""Model provider: TransformerConfig mapping, TE/FP8 selection and validation (no model is built)."""
import pytest
import torch

from megatron_pz.errors import ConfigError
from megatron_pz.model import provider
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.provider import ModelConfig, build_transformer_config
from megatron_pz.parallel import ParallelConfig

ARCH = ModelArch(family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                 num_query_groups=2, head_dim=24, vocab_size=300, max_position_embeddings=128, qk_norm=True)


def test_cpu_config_maps_architecture_and_disables_cuda_fusions():
    if torch.cuda.is_available():
        pytest.skip("CPU-specific defaults")
    c = build_transformer_config(ARCH, ModelConfig(dtype="fp32"), ParallelConfig(tensor_model_parallel_size=2))
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.kv_channels, c.num_query_groups) == (4, 64, 96, 24, 2)
    assert c.qk_layernorm and c.gated_linear_unit and c.normalization == "RMSNorm" and not c.add_bias_linear
    assert c.tensor_model_parallel_size == 2 and c.use_cpu_initialization
    assert not (c.bias_activation_fusion or c.masked_softmax_fusion or c.apply_rope_fusion
                or c.gradient_accumulation_fusion or c.persist_layer_norm)
    assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0  # deterministic policy for RL


def test_bf16_flags():
    c = build_transformer_config(ARCH, ModelConfig(dtype="bf16"))
    assert c.bf16 and not c.fp16 and c.params_dtype == torch.bfloat16


def test_transformer_engine_requested_without_te_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(provider, "transformer_engine_available", lambda: False)
    with pytest.raises(ConfigError, match="Transformer Engine"):
        build_transformer_config(ARCH, ModelConfig(transformer_impl="transformer_engine"))
    with pytest.raises(ConfigError, match="fp8 needs Transformer Engine"):
        build_transformer_config(ARCH, ModelConfig(fp8="e4m3"))
    assert provider.use_transformer_engine(ModelConfig()) is False  # auto falls back to the local spec


def test_fp8_recipe_passes_through_when_te_is_present(monkeypatch):
    monkeypatch.setattr(provider, "transformer_engine_available", lambda: True)
    c = build_transformer_config(ARCH, ModelConfig(fp8="hybrid", fp8_recipe="blockwise", fp8_amax_history_len=16))
    assert (c.fp8, c.fp8_recipe, c.fp8_amax_history_len) == ("hybrid", "blockwise", 16)


def test_parallel_divisibility_checked_before_megatron():
    with pytest.raises(ConfigError, match="num_layers=4 is not divisible by pipeline_model_parallel_size=3"):
        build_transformer_config(ARCH, ModelConfig(), ParallelConfig(pipeline_model_parallel_size=3))
    with pytest.raises(ConfigError, match="expert_model_parallel_size=2 needs an MoE model"):
        build_transformer_config(ARCH, ModelConfig(), ParallelConfig(expert_model_parallel_size=2))


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "fp64"}, "model.dtype"), ({"transformer_impl": "apex"}, "transformer_impl"),
    ({"fp8": "e5m2"}, "model.fp8"), ({"recompute_granularity": "some"}, "recompute_granularity")])
def test_model_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_unknown_transformer_override_is_named():
    with pytest.raises(ConfigError, match="invalid TransformerConfig option"):
        build_transformer_config(ARCH, ModelConfig(transformer_overrides={"no_such_field": 1}))


def test_parallel_config_world_split():
    p = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2)
    assert p.data_parallel_size(16) == 2
    with pytest.raises(ConfigError, match="world size 12 is not divisible by TP x PP x CP"):
        p.data_parallel_size(12)
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size=4 x expert_tensor_parallel_size=1 must "
                                          r"divide .* = 6"):
        ParallelConfig(expert_model_parallel_size=4).data_parallel_size(6)
    with pytest.raises(ConfigError, match="sequence_parallel needs"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size must be a positive integer"):
        ParallelConfig(tensor_model_parallel_size=0)


# ----------------------------------------------------------------------------- MoE and NoPE
MOE = ModelArch(family="qwen3_moe", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, head_dim=24, vocab_size=300, max_position_embeddings=128, qk_norm=True,
                num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_norm_topk_prob=True)


@pytest.mark.parametrize("norm_topk_prob,pre_softmax", [(True, False), (False, True)])
def test_moe_router_reproduces_hf_routing(norm_topk_prob, pre_softmax):
    """HF renormalises the top-k softmax probabilities iff norm_topk_prob; Megatron's softmax over the top-k
    logits (pre_softmax=False) is exactly that, softmax-then-top-k (pre_softmax=True) is the raw variant."""
    import dataclasses

    c = build_transformer_config(dataclasses.replace(MOE, moe_norm_topk_prob=norm_topk_prob), ModelConfig(dtype="fp32"))
    assert (c.num_moe_experts, c.moe_ffn_hidden_size, c.moe_router_topk) == (4, 32, 2)
    assert c.moe_router_score_function == "softmax" and c.moe_router_pre_softmax is pre_softmax
    assert c.moe_router_topk_scaling_factor is None and not c.moe_router_enable_expert_bias
    assert c.moe_router_load_balancing_type == "none" and c.moe_aux_loss_coeff == 0.0  # forward == HF's
    assert c.moe_token_dispatcher_type == "alltoall" and not c.moe_grouped_gemm  # no TE on this machine
    assert c.moe_router_dtype is None and c.moe_expert_capacity_factor is None


def test_moe_aux_loss_and_dispatcher_options():
    c = build_transformer_config(MOE, ModelConfig(moe_aux_loss_coeff=1e-3, moe_token_dispatcher="allgather",
                                                  moe_router_dtype="fp32"))
    assert (c.moe_router_load_balancing_type, c.moe_aux_loss_coeff) == ("aux_loss", 1e-3)
    assert c.moe_token_dispatcher_type == "allgather" and c.moe_router_dtype == "fp32"
    with pytest.raises(ConfigError, match="moe_token_dispatcher"):
        ModelConfig(moe_token_dispatcher="flex")
    with pytest.raises(ConfigError, match="moe_grouped_gemm=true needs Transformer Engine"):
        build_transformer_config(MOE, ModelConfig(moe_grouped_gemm=True))


def test_moe_parallel_rules():
    par = ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    # Megatron's MoE layer refuses to train with TP > 1 and no sequence parallelism: caught up front ...
    with pytest.raises(ConfigError, match="needs parallel.sequence_parallel: true"):
        build_transformer_config(MOE, ModelConfig(), par)
    # ... but forward-only use (conversion, evaluation) is fine, with experts unsplit (ETP=1).
    c = build_transformer_config(MOE, ModelConfig(), par, training=False)
    assert (c.expert_model_parallel_size, c.expert_tensor_parallel_size) == (2, 1)
    with pytest.raises(ConfigError, match="num_experts=4 is not divisible by expert_model_parallel_size=3"):
        build_transformer_config(MOE, ModelConfig(), ParallelConfig(expert_model_parallel_size=3))
    # local spec (no TE): sequence parallelism cannot work, whatever the model
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sequence_parallel needs Transformer Engine"):
            build_transformer_config(MOE, ModelConfig(), ParallelConfig(tensor_model_parallel_size=2,
                                                                        sequence_parallel=True))
    # world / PP = ETP x EP x expert-DP: TP4 x EP8 with ETP=1 fits 8 ranks, EP8 with ETP=TP=4 does not
    assert ParallelConfig(tensor_model_parallel_size=4, expert_model_parallel_size=8,
                          expert_tensor_parallel_size=1).data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match="expert_model_parallel_size=8 x expert_tensor_parallel_size=4"):
        ParallelConfig(tensor_model_parallel_size=4, expert_model_parallel_size=8).data_parallel_size(8)
    with pytest.raises(ConfigError, match="expert_tensor_parallel_size must be null or a positive"):
        ParallelConfig(expert_tensor_parallel_size=0)


def test_moe_local_spec_keeps_pre_mlp_norm_key_and_dense_spec_is_unchanged():
    from megatron_pz.model.provider import layer_spec

    moe_keys = layer_spec(MOE, ModelConfig(dtype="fp32")).submodules.sharded_state_dict_keys_map
    dense_keys = layer_spec(ARCH, ModelConfig(dtype="fp32")).submodules.sharded_state_dict_keys_map
    assert "pre_mlp_layernorm." not in moe_keys and "input_layernorm." in moe_keys
    assert dense_keys["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"


def test_nope_layers_become_megatron_no_rope_freq():
    import dataclasses

    smol = dataclasses.replace(ARCH, family="smollm3", qk_norm=False, nope_layers=[3])
    c = build_transformer_config(smol, ModelConfig(dtype="fp32"))
    assert c.no_rope_freq == [0, 0, 0, 1]  # 1 = skip RoPE on that layer (Attention reads it by layer_number)
    assert build_transformer_config(ARCH, ModelConfig(dtype="fp32")).no_rope_freq is None
