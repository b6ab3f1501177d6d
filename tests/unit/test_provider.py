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
    with pytest.raises(ConfigError, match="expert_model_parallel_size=4 must divide DP x CP"):
        ParallelConfig(expert_model_parallel_size=4).data_parallel_size(6)
    with pytest.raises(ConfigError, match="sequence_parallel needs"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size must be a positive integer"):
        ParallelConfig(tensor_model_parallel_size=0)
