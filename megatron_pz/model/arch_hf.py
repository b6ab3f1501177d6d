"""ModelArch <-> HF ``config.json``: which keys each supported family reads and writes.

``ModelArch.from_hf_config`` / ``ModelArch.to_hf_config`` call these; the dataclass itself lives in ``model.arch``.
HF configs differ across transformers versions (``rope_parameters`` vs ``rope_theta``, ``num_local_experts`` vs
``num_experts``); reading accepts both and writing keeps the spelling of the source config.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_pz.errors import ConfigError
from megatron_pz.model.arch_fields import ArchFields

# HF `model_type` -> family. Each family differs from Llama only in the flags set in
# `arch_fields_from_hf_config`.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
                         "smollm3": "smollm3"}

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM", "smollm3": "SmolLM3ForCausalLM"}

# Megatron-Core's built-in Llama-3 rope scaling only takes `factor`; these are the other values it assumes.
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# transformers' default rope_theta where a config.json omits it and the family's default is not 10000.
DEFAULT_ROPE_THETA = {"smollm3": 2000000.0}


def arch_fields_from_hf_config(cfg: dict[str, Any] | str | Path) -> dict[str, Any]:
    """ModelArch fields from an HF ``config.json`` (dict, file or model folder)."""
    if not isinstance(cfg, dict):
        path = Path(cfg)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no HF config at {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported architecture: model_type={model_type!r} "
            f"(architectures={cfg.get('architectures')}); supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    family = SUPPORTED_MODEL_TYPES[model_type]

    def need(key: str) -> Any:
        if key not in cfg:
            raise ConfigError(f"HF config ({model_type}) lacks required key {key!r}")
        return cfg[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    rope = cfg.get("rope_parameters") or {}
    legacy_scaling = cfg.get("rope_scaling") or {}
    # transformers>=5 keeps rope settings in rope_parameters; a top-level rope_theta is the legacy form.
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA.get(family, 10000.0))))
    rope_type = (rope.get("rope_type") or legacy_scaling.get("rope_type") or legacy_scaling.get("type")
                 or "default")
    scaling = {**legacy_scaling, **{k: v for k, v in rope.items() if k != "rope_theta"}}
    factor = interpolation = None
    if rope_type == "linear":  # Megatron's seq_len_interpolation_factor: positions / factor
        interpolation = float(need_in(scaling, "factor", "rope scaling (linear)"))
    elif rope_type == "llama3":
        for k, default in LLAMA3_ROPE_DEFAULTS.items():
            if k in scaling and float(scaling[k]) != default:
                raise ConfigError(f"rope scaling {k}={scaling[k]} is not supported by Megatron-Core's "
                                  f"Llama-3 rope (expects {default})")
        factor = float(scaling.get("factor", 8.0))
    elif rope_type != "default":
        raise ConfigError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")
    if cfg.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not supported (no Llama/Qwen checkpoint uses it)")
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise ConfigError("sliding-window attention is not supported; set use_sliding_window=false")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={cfg.get('hidden_act')!r} is not supported (expects silu)")
    qkv_bias = family == "qwen2" or bool(cfg.get("attention_bias", False))
    num_layers = int(need("num_hidden_layers"))
    moe: dict[str, Any] = {}
    if family == "qwen3_moe":
        moe = _read_qwen3_moe(cfg, num_layers, need)
    nope_layers: list[int] = []
    if family == "smollm3":
        nope_layers = _read_smollm3_nope_layers(cfg, num_layers)
    return dict(
        family=family,
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(need("vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=rope_theta,
        rope_scaling_factor=factor,
        rope_interpolation_factor=interpolation,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        # transformers' default differs per family (SmolLM3 ties, the others do not).
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "smollm3")),
        qkv_bias=qkv_bias,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        nope_layers=nope_layers,
        **moe,
        hf_config={k: v for k, v in cfg.items() if k not in ("quantization_config",)},
    )


def hf_config_of(arch: ArchFields) -> dict[str, Any]:
    """An HF config.json for this architecture (the stored original, refreshed from its fields)."""
    cfg = dict(arch.hf_config)
    cfg.update(
        architectures=cfg.get("architectures") or [HF_ARCHITECTURES[arch.family]],
        model_type=arch.family,
        num_hidden_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings,
        hidden_act="silu",
    )
    if arch.family in ("llama", "smollm3"):
        cfg["attention_bias"] = arch.qkv_bias
    if arch.family == "smollm3":
        cfg["no_rope_layers"] = [0 if i in arch.nope_layers else 1 for i in range(arch.num_layers)]
    if arch.is_moe:
        # transformers 5 writes num_local_experts, the Hub's Qwen3-MoE configs say num_experts: keep the source's.
        cfg["num_local_experts" if "num_local_experts" in cfg else "num_experts"] = arch.num_experts
        cfg.update(moe_intermediate_size=arch.moe_ffn_hidden_size, num_experts_per_tok=arch.moe_router_topk,
                   norm_topk_prob=arch.moe_norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    scaling: dict[str, Any] = {}
    if arch.rope_scaling_factor is not None:
        scaling = {"rope_type": "llama3", "factor": arch.rope_scaling_factor, **LLAMA3_ROPE_DEFAULTS}
    elif arch.rope_interpolation_factor is not None:
        scaling = {"rope_type": "linear", "factor": arch.rope_interpolation_factor}
    if "rope_parameters" in cfg or "rope_theta" not in cfg:
        cfg["rope_parameters"] = {"rope_theta": arch.rope_theta, "rope_type": "default", **scaling}
        cfg.pop("rope_scaling", None)  # one place for the scaling, so readers cannot disagree
    else:  # the legacy spelling (transformers < 5): rope_theta + rope_scaling
        cfg["rope_theta"] = arch.rope_theta
        if scaling:
            cfg["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
        else:
            cfg.pop("rope_scaling", None)
    return cfg


def need_in(d: dict[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise ConfigError(f"HF config: {what} lacks required key {key!r}")
    return d[key]


# ---------------------------------------------------------------------- family-specific readers
def _read_qwen3_moe(cfg: dict[str, Any], num_layers: int, need: Any) -> dict[str, Any]:
    """ModelArch MoE fields from a Qwen3-MoE config.json (every layer sparse, no shared expert)."""
    # transformers 5 saves num_local_experts; the Hub's configs (and transformers 4) say num_experts.
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if experts is None:
        raise ConfigError("HF config (qwen3_moe) lacks required key 'num_experts' (or 'num_local_experts')")
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = sorted(set(cfg.get("mlp_only_layers") or []) | {i for i in range(num_layers) if (i + 1) % step})
    if dense:
        raise ConfigError(f"Qwen3-MoE with dense MLP layers {dense[:8]} (decoder_sparse_step={step}, "
                          f"mlp_only_layers={cfg.get('mlp_only_layers')}) is not supported: every layer must be "
                          f"MoE, as in all released Qwen3-MoE models")
    if cfg.get("shared_expert_intermediate_size"):
        raise ConfigError("Qwen3-MoE config with shared_expert_intermediate_size: shared experts are not supported")
    return dict(num_experts=int(experts), moe_ffn_hidden_size=int(need("moe_intermediate_size")),
                moe_router_topk=int(need("num_experts_per_tok")),
                moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))


def _read_smollm3_nope_layers(cfg: dict[str, Any], num_layers: int) -> list[int]:
    """Indices of SmolLM3's NoPE layers. HF's ``no_rope_layers[i]`` is 1 where layer i *uses* RoPE."""
    flags = cfg.get("no_rope_layers")
    if flags is None:  # transformers derives it from the interval: every interval-th layer is NoPE
        interval = int(cfg.get("no_rope_layer_interval", 4))
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) < num_layers:
        raise ConfigError(f"SmolLM3 no_rope_layers has {len(flags)} entries for {num_layers} layers")
    return [i for i in range(num_layers) if not flags[i]]
