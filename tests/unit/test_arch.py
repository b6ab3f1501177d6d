"""ModelArch: reading HF configs and Megatron-LM args, padded vocab, parallel validation."""
import argparse

import pytest

from megatron_pz.errors import ConfigError
from megatron_pz.model.arch import ModelArch

SMOLLM2 = {  # the fields of SmolLM2-135M-Instruct's config.json that matter
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30,
    "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
    "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "hidden_act": "silu",
}


def test_llama_config_fields():
    a = ModelArch.from_hf_config(SMOLLM2)
    assert (a.family, a.num_layers, a.hidden_size, a.ffn_hidden_size) == ("llama", 30, 576, 1536)
    assert (a.num_attention_heads, a.num_query_groups, a.head_dim) == (9, 3, 64)
    assert a.rope_theta == 100000.0 and a.tie_word_embeddings and not a.qkv_bias and not a.qk_norm


def test_transformers5_rope_parameters_and_qwen_flags():
    q3 = ModelArch.from_hf_config({**SMOLLM2, "model_type": "qwen3", "head_dim": 128, "num_attention_heads": 8,
                                   "num_key_value_heads": 4, "rope_parameters": {"rope_theta": 1e6,
                                                                                 "rope_type": "default"}})
    assert q3.qk_norm and not q3.qkv_bias and q3.head_dim == 128 and q3.rope_theta == 1e6
    q2 = ModelArch.from_hf_config({**SMOLLM2, "model_type": "qwen2"})
    assert q2.qkv_bias and not q2.qk_norm


def test_llama3_rope_scaling_factor_and_unsupported_types():
    a = ModelArch.from_hf_config({**SMOLLM2, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 8192}})
    assert a.rope_scaling_factor == 32.0
    with pytest.raises(ConfigError, match="yarn"):
        ModelArch.from_hf_config({**SMOLLM2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="high_freq_factor"):
        ModelArch.from_hf_config({**SMOLLM2, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                              "high_freq_factor": 2.0}})


def test_unsupported_architecture_names_it():
    with pytest.raises(ConfigError, match="model_type='mistral'"):
        ModelArch.from_hf_config({**SMOLLM2, "model_type": "mistral"})
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelArch.from_hf_config({k: v for k, v in SMOLLM2.items() if k != "intermediate_size"})


def test_padded_vocab_follows_megatron_lm_rule():
    a = ModelArch.from_hf_config({**SMOLLM2, "vocab_size": 151936})  # Qwen3's vocab
    assert a.padded_vocab_size(1) == 151936  # 1187 x 128
    assert a.padded_vocab_size(2) == 152064  # ceil(151936 / 256) x 256 = 594 x 256
    assert ModelArch.from_hf_config({**SMOLLM2, "vocab_size": 300}).padded_vocab_size(1) == 384


def test_wrong_tp_for_head_count_names_the_heads():
    a = ModelArch.from_hf_config(SMOLLM2)  # 9 heads, 3 KV heads
    a.validate_parallel(tp=3, pp=2)
    with pytest.raises(ConfigError, match="num_attention_heads=9 is not divisible by tensor_model_parallel_size=2"):
        a.validate_parallel(tp=2)
    with pytest.raises(ConfigError, match="num_layers=30 is not divisible by pipeline_model_parallel_size=4"):
        a.validate_parallel(pp=4)


def test_hf_config_roundtrip_and_dict_roundtrip():
    a = ModelArch.from_hf_config(SMOLLM2)
    again = ModelArch.from_hf_config(a.to_hf_config())
    assert again.to_dict() == {**a.to_dict(), "hf_config": again.hf_config}
    assert ModelArch.from_dict(a.to_dict()) == a
    with pytest.raises(ConfigError, match="unknown model architecture fields"):
        ModelArch.from_dict({**a.to_dict(), "bogus": 1})


def test_from_megatron_lm_args():
    args = argparse.Namespace(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                              group_query_attention=True, num_query_groups=3, kv_channels=64,
                              padded_vocab_size=49152, max_position_embeddings=8192, rotary_base=100000,
                              norm_epsilon=1e-5, untie_embeddings_and_output_weights=False,
                              position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                              make_vocab_size_divisible_by=128)
    a = ModelArch.from_megatron_args(args)
    ref = ModelArch.from_hf_config(SMOLLM2)
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "head_dim", "vocab_size", "rope_theta", "tie_word_embeddings", "family"):
        assert getattr(a, f) == getattr(ref, f), f
    with pytest.raises(ConfigError, match="SwiGLU"):
        ModelArch.from_megatron_args(argparse.Namespace(**{**vars(args), "swiglu": False}))
