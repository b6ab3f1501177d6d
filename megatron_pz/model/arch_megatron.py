"""ModelArch <-> Megatron-LM ``args``: the architecture of a Megatron-LM checkpoint, and the extra args (MoE,
NoPE) we write into ours so that Megatron-LM reads them back the same.

``ModelArch.from_megatron_args`` / ``ModelArch.megatron_lm_extra_args`` call these; the whole namespace we save
is ``checkpoint.layout.megatron_lm_args``.
"""
from __future__ import annotations

from typing import Any

from megatron_pz.errors import ConfigError
from megatron_pz.model.arch_fields import ArchFields


def megatron_lm_extra_args(arch: ArchFields) -> dict[str, Any]:
    """Megatron-LM args beyond the Llama-style ones (as --no-rope-freq, --num-experts, ... set them)."""
    extra: dict[str, Any] = {}
    if arch.rope_interpolation_factor is not None:
        extra["rotary_seq_len_interpolation_factor"] = arch.rope_interpolation_factor
    if arch.nope_layers:
        extra["no_rope_freq"] = [int(i in arch.nope_layers) for i in range(arch.num_layers)]
    if arch.is_moe:
        extra.update(num_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
                     moe_router_topk=arch.moe_router_topk, moe_router_score_function="softmax",
                     moe_router_pre_softmax=not arch.moe_norm_topk_prob, moe_layer_freq=1)
    return extra


def arch_fields_from_megatron_args(args: Any, vocab_size: int | None = None) -> dict[str, Any]:
    """ModelArch fields from the ``args`` Namespace Megatron-LM stores in its checkpoints.

    ``vocab_size``: the tokenizer's true vocabulary (Megatron-LM stores only the padded size); when
    omitted, the padded size is taken as the vocabulary.
    """
    a = vars(args) if not isinstance(args, dict) else args

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        v = a.get(key, default)
        if required and v is None:
            raise ConfigError(f"Megatron-LM args in the checkpoint lack {key!r}")
        return v

    moe: dict[str, Any] = {}
    if get("num_experts"):
        moe = _read_megatron_moe_args(get)
    if get("position_embedding_type", "rope") != "rope":
        raise ConfigError(f"position_embedding_type={get('position_embedding_type')!r} unsupported (rope)")
    if get("normalization", "RMSNorm") != "RMSNorm":
        raise ConfigError(f"normalization={get('normalization')!r} unsupported (RMSNorm)")
    if not get("swiglu", True):
        raise ConfigError("checkpoint does not use SwiGLU (--swiglu); unsupported")
    heads = int(get("num_attention_heads", required=True))
    hidden = int(get("hidden_size", required=True))
    groups = int(get("num_query_groups") or heads) if get("group_query_attention") else heads
    padded = int(get("padded_vocab_size", required=True))
    qk_norm = bool(get("qk_layernorm", False))
    qkv_bias = bool(get("add_qkv_bias", False))
    num_layers = int(get("num_layers", required=True))
    nope_layers = _nope_layers_from_no_rope_freq(get("no_rope_freq"), num_layers)
    if moe:
        if not qk_norm or qkv_bias or nope_layers:
            raise ConfigError("Megatron-LM MoE checkpoint: only Qwen3-MoE (qk_layernorm, no q/k/v bias, RoPE on "
                              "every layer) is supported")
        family = "qwen3_moe"
    elif nope_layers:
        if qk_norm or qkv_bias:
            raise ConfigError("Megatron-LM checkpoint with NoPE layers (no_rope_freq): only SmolLM3 (no "
                              "qk_layernorm, no q/k/v bias) is supported")
        family = "smollm3"
    else:
        family = "qwen3" if qk_norm else ("qwen2" if qkv_bias else "llama")
    return dict(
        family=family,
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=int(get("ffn_hidden_size", required=True)),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(get("kv_channels") or hidden // heads),
        vocab_size=int(vocab_size or padded),
        max_position_embeddings=int(get("max_position_embeddings") or get("seq_length") or 4096),
        rope_theta=float(get("rotary_base", 10000)),
        rope_scaling_factor=float(get("rope_scaling_factor", 8.0)) if get("use_rope_scaling") else None,
        # --rotary-seq-len-interpolation-factor (Megatron-LM saves it as an int or None).
        rope_interpolation_factor=(float(get("rotary_seq_len_interpolation_factor"))
                                   if get("rotary_seq_len_interpolation_factor") else None),
        norm_eps=float(get("norm_epsilon", 1e-5)),
        tie_word_embeddings=not bool(get("untie_embeddings_and_output_weights", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        nope_layers=nope_layers,
        **moe,
        make_vocab_size_divisible_by=int(get("make_vocab_size_divisible_by", 128)),
        min_padded_vocab_size=_extra_padding(padded, vocab_size, get),
    )


def _extra_padding(padded: int, vocab_size: int | None, get: Any) -> int | None:
    """The saved padded size when the true vocabulary alone would pad to fewer rows at the saved TP (Megatron-LM's
    NullTokenizer pads vocab_size + 1; an explicit smaller vocabulary), so the model keeps those rows."""
    multiple = int(get("make_vocab_size_divisible_by", 128)) * int(get("tensor_model_parallel_size") or 1)
    if not vocab_size or -(-vocab_size // multiple) * multiple == padded:
        return None
    return padded


def _read_megatron_moe_args(get: Any) -> dict[str, Any]:
    """MoE fields from Megatron-LM args; refuses the MoE variants Qwen3-MoE does not use."""
    for key, ok in (("moe_shared_expert_intermediate_size", None), ("moe_router_topk_scaling_factor", None),
                    ("moe_router_score_function", "softmax"), ("moe_router_num_groups", None)):
        v = get(key, ok)
        if v != ok:
            raise ConfigError(f"Megatron-LM MoE checkpoint sets {key}={v!r}; only Qwen3-MoE-style routing "
                              f"(softmax, no groups, no scaling, no shared expert) is supported")
    freq = get("moe_layer_freq", 1)
    if freq not in (1, None) and not (isinstance(freq, (list, tuple)) and all(f == 1 for f in freq)):
        raise ConfigError(f"Megatron-LM MoE checkpoint has dense layers (moe_layer_freq={freq!r}); every layer "
                          f"must be MoE")
    # Megatron's softmax-after-top-k (pre_softmax=False) is HF's norm_topk_prob=True; see model/provider.py.
    return dict(num_experts=int(get("num_experts")),
                moe_ffn_hidden_size=int(get("moe_ffn_hidden_size") or get("ffn_hidden_size", required=True)),
                moe_router_topk=int(get("moe_router_topk", 2)),
                moe_norm_topk_prob=not bool(get("moe_router_pre_softmax", False)))


def _nope_layers_from_no_rope_freq(freq: Any, num_layers: int) -> list[int]:
    """Megatron's ``no_rope_freq`` (int N = every N-th layer skips RoPE, or a 0/1 list, 1 = skip) -> indices."""
    if not freq:
        return []
    if isinstance(freq, int):
        return [i for i in range(num_layers) if (i + 1) % freq == 0]
    return [i for i, skip in enumerate(freq) if skip]
