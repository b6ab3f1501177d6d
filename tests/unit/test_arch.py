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


# ----------------------------------------------------------------------------- Qwen3-MoE and SmolLM3
QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B(-Base) config.json, as the Hub stores it (transformers 4 spelling)
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "router_aux_loss_coef": 0.001,
}
SMOLLM3_3B = {  # HuggingFaceTB/SmolLM3-3B config.json
    "model_type": "smollm3", "architectures": ["SmolLM3ForCausalLM"], "hidden_size": 2048,
    "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4,
    "vocab_size": 128256, "max_position_embeddings": 65536, "rope_theta": 5000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "no_rope_layer_interval": 4, "hidden_act": "silu",
    "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)], "use_sliding_window": False,
}


def test_qwen3_moe_fields_and_parameter_counts():
    a = ModelArch.from_hf_config(QWEN3_30B_A3B)
    assert (a.family, a.num_experts, a.moe_ffn_hidden_size, a.moe_router_topk) == ("qwen3_moe", 128, 768, 8)
    assert a.moe_norm_topk_prob and a.qk_norm and not a.qkv_bias and a.is_moe and a.nope_layers == []
    assert round(a.num_parameters / 1e9, 2) == 30.53  # "30.5B total"
    assert round(a.num_active_parameters / 1e9, 2) == 3.35  # "3.3B activated"
    # transformers 5 saves num_local_experts instead of num_experts; both read, export keeps the source's key
    t5 = {k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"} | {"num_local_experts": 128}
    assert ModelArch.from_hf_config(t5).num_experts == 128
    assert "num_local_experts" in ModelArch.from_hf_config(t5).to_hf_config()
    assert ModelArch.from_hf_config({**QWEN3_30B_A3B, "norm_topk_prob": False}).moe_norm_topk_prob is False


def test_qwen3_moe_roundtrips_and_rejects_dense_layers():
    a = ModelArch.from_hf_config(QWEN3_30B_A3B)
    hf = a.to_hf_config()
    assert (hf["num_experts"], hf["moe_intermediate_size"], hf["num_experts_per_tok"], hf["norm_topk_prob"]) == \
        (128, 768, 8, True)
    assert ModelArch.from_hf_config(hf).to_dict() | {"hf_config": {}} == a.to_dict() | {"hf_config": {}}
    assert ModelArch.from_dict(a.to_dict()) == a
    with pytest.raises(ConfigError, match=r"dense MLP layers \[0, 2, 4"):
        ModelArch.from_hf_config({**QWEN3_30B_A3B, "decoder_sparse_step": 2})
    with pytest.raises(ConfigError, match=r"dense MLP layers \[5\]"):
        ModelArch.from_hf_config({**QWEN3_30B_A3B, "mlp_only_layers": [5]})
    with pytest.raises(ConfigError, match="num_experts"):
        ModelArch.from_hf_config({k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"})


def test_expert_parallel_validation():
    a = ModelArch.from_hf_config(QWEN3_30B_A3B)
    a.validate_parallel(tp=4, ep=8, etp=1)
    a.validate_parallel(tp=2, pp=2, ep=16)  # etp = tp = 2: 768 / 2
    with pytest.raises(ConfigError, match="num_experts=128 is not divisible by expert_model_parallel_size=6"):
        a.validate_parallel(ep=6)
    with pytest.raises(ConfigError, match=r"moe_ffn_hidden_size \(moe_intermediate_size\)=768 is not divisible "
                                          r"by expert_tensor_parallel_size=5"):
        a.validate_parallel(etp=5)
    dense = ModelArch.from_hf_config(SMOLLM2)
    with pytest.raises(ConfigError, match="expert_model_parallel_size=2 needs an MoE model; llama is dense"):
        dense.validate_parallel(ep=2)


def test_smollm3_nope_layers_and_defaults():
    a = ModelArch.from_hf_config(SMOLLM3_3B)
    assert a.family == "smollm3" and a.nope_layers == [3, 7, 11, 15, 19, 23, 27, 31, 35]
    assert a.tie_word_embeddings and not a.qk_norm and a.rope_theta == 5e6 and a.head_dim == 128
    assert round(a.num_parameters / 1e9, 2) == 3.08
    # without the explicit list, transformers derives it from the interval; so do we
    derived = {k: v for k, v in SMOLLM3_3B.items() if k != "no_rope_layers"}
    assert ModelArch.from_hf_config(derived).nope_layers == a.nope_layers
    # SmolLM3Config's defaults: tied embeddings, rope_theta 2e6
    bare = {k: v for k, v in derived.items() if k not in ("tie_word_embeddings", "rope_theta")}
    assert ModelArch.from_hf_config(bare).tie_word_embeddings and ModelArch.from_hf_config(bare).rope_theta == 2e6
    back = a.to_hf_config()
    assert back["no_rope_layers"] == SMOLLM3_3B["no_rope_layers"] and back["model_type"] == "smollm3"
    assert ModelArch.from_hf_config(back).nope_layers == a.nope_layers
    with pytest.raises(ConfigError, match="nope_layers"):
        ModelArch.from_dict({**a.to_dict(), "nope_layers": [36]})


def test_moe_and_nope_from_megatron_lm_args():
    moe = argparse.Namespace(num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
                             group_query_attention=True, num_query_groups=4, kv_channels=128,
                             padded_vocab_size=151936, max_position_embeddings=40960, rotary_base=1000000,
                             norm_epsilon=1e-6, untie_embeddings_and_output_weights=True, qk_layernorm=True,
                             num_experts=128, moe_ffn_hidden_size=768, moe_router_topk=8,
                             moe_router_pre_softmax=False, moe_router_score_function="softmax")
    a = ModelArch.from_megatron_args(moe)
    ref = ModelArch.from_hf_config(QWEN3_30B_A3B)
    for f in ("family", "num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_norm_topk_prob",
              "num_query_groups", "head_dim", "tie_word_embeddings", "qk_norm"):
        assert getattr(a, f) == getattr(ref, f), f
    with pytest.raises(ConfigError, match="moe_shared_expert_intermediate_size"):
        ModelArch.from_megatron_args(argparse.Namespace(**{**vars(moe), "moe_shared_expert_intermediate_size": 512}))
    with pytest.raises(ConfigError, match="dense layers"):
        ModelArch.from_megatron_args(argparse.Namespace(**{**vars(moe), "moe_layer_freq": [0] + [1] * 47}))
    nope = argparse.Namespace(num_layers=36, hidden_size=2048, ffn_hidden_size=11008, num_attention_heads=16,
                              group_query_attention=True, num_query_groups=4, padded_vocab_size=128256,
                              rotary_base=5000000, no_rope_freq=4)
    s = ModelArch.from_megatron_args(nope)
    assert s.family == "smollm3" and s.nope_layers == ModelArch.from_hf_config(SMOLLM3_3B).nope_layers


@pytest.mark.parametrize("cfg", [QWEN3_30B_A3B, SMOLLM3_3B], ids=["qwen3_moe", "smollm3"])
def test_megatron_lm_args_we_save_read_back(cfg):
    """common.pt's args describe MoE / NoPE models too, so Megatron-LM (and from_megatron_args) see them."""
    import torch

    from megatron_pz.checkpoint import megatron_lm_args

    a = ModelArch.from_hf_config(cfg)
    back = ModelArch.from_megatron_args(megatron_lm_args(a, tp=2, pp=1, dtype=torch.bfloat16), vocab_size=a.vocab_size)
    assert back.to_dict() | {"hf_config": {}} == a.to_dict() | {"hf_config": {}}


def test_families_agree_and_every_constructor_gives_a_model_arch():
    """model.arch_fields holds the families the dataclass accepts, model.arch_hf the HF model types: they agree,
    and from_dict / from_hf_config / from_megatron_args (defined on ArchFields or ModelArch) build a ModelArch."""
    from megatron_pz.model.arch import FAMILIES, SUPPORTED_MODEL_TYPES
    from megatron_pz.model.arch_hf import HF_ARCHITECTURES

    assert set(SUPPORTED_MODEL_TYPES.values()) == set(FAMILIES) == set(HF_ARCHITECTURES)
    a = ModelArch.from_hf_config(SMOLLM3_3B)
    for built in (a, ModelArch.from_dict(a.to_dict())):
        assert type(built) is ModelArch and built == a
    with pytest.raises(ConfigError, match="unsupported model family 'gpt2'"):
        ModelArch(**{**a.to_dict(), "family": "gpt2"})
