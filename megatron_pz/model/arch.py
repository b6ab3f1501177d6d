"""One description of a decoder-only architecture, readable from an HF ``config.json`` or Megatron-LM args.

``ModelArch`` is the single source of truth the model provider, the converters and the checkpoints share.
It is a plain dataclass (JSON round-trippable) so it can be stored beside every checkpoint.

Supported dense families: Llama (incl. SmolLM2), Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_pz.errors import ConfigError

# HF `model_type` -> family. Each family differs from Llama only in the flags set in `from_hf_config`.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Megatron-Core's built-in Llama-3 rope scaling only takes `factor`; these are the other values it assumes.
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class ModelArch:
    """Architecture hyper-parameters of a dense GPT-style decoder (Llama/Qwen2/Qwen3)."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # = num_key_value_heads (GQA)
    head_dim: int  # = kv_channels; Qwen3 sets it explicitly, others use hidden/heads
    vocab_size: int  # rows of the HF embedding; Megatron pads beyond this, never past it on export
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama-3 style scaling factor, None = no scaling
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    # Megatron pads the vocab to a multiple of (this x TP), as Megatron-LM's --make-vocab-size-divisible-by.
    make_vocab_size_divisible_by: int = 128
    # The original HF config.json (without weights-specific entries), kept so export reproduces it.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ derived
    def padded_vocab_size(self, tp: int) -> int:
        """Megatron-LM's rule: round the vocab up to a multiple of make_vocab_size_divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def num_parameters(self) -> int:
        """Parameter count of the HF model (unpadded vocab)."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h

    # ------------------------------------------------------------------ validation
    def validate_parallel(self, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1) -> None:
        """Raise ConfigError if this architecture cannot be split this way (before any process starts)."""
        for name, v in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp), ("expert_model_parallel_size", ep)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}")
        if self.num_query_groups % tp:
            raise ConfigError(
                f"num_query_groups (num_key_value_heads)={self.num_query_groups} is not divisible by "
                f"tensor_model_parallel_size={tp}; choose TP among the divisors of the KV-head count")
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        if self.num_layers % pp:
            raise ConfigError(
                f"num_layers={self.num_layers} is not divisible by pipeline_model_parallel_size={pp}")
        if ep > 1:
            raise ConfigError(f"expert_model_parallel_size={ep} needs an MoE model; {self.family} is dense")

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_MODEL_TYPES.values():
            raise ConfigError(f"unsupported model family {self.family!r}; supported: "
                              f"{sorted(set(SUPPORTED_MODEL_TYPES.values()))}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model architecture field {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_query_groups}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArch":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown model architecture fields: {sorted(unknown)}")
        return cls(**d)

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | str | Path) -> "ModelArch":
        """Read an HF ``config.json`` (dict, file or model folder)."""
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
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = (rope.get("rope_type") or legacy_scaling.get("rope_type") or legacy_scaling.get("type")
                     or "default")
        scaling = {**legacy_scaling, **{k: v for k, v in rope.items() if k != "rope_theta"}}
        factor = None
        if rope_type == "llama3":
            for k, default in _LLAMA3_ROPE_DEFAULTS.items():
                if k in scaling and float(scaling[k]) != default:
                    raise ConfigError(f"rope scaling {k}={scaling[k]} is not supported by Megatron-Core's "
                                      f"Llama-3 rope (expects {default})")
            factor = float(scaling.get("factor", 8.0))
        elif rope_type != "default":
            raise ConfigError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias=True is not supported (no Llama/Qwen checkpoint uses it)")
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            raise ConfigError("sliding-window attention is not supported; set use_sliding_window=false")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={cfg.get('hidden_act')!r} is not supported (expects silu)")
        qkv_bias = family == "qwen2" or bool(cfg.get("attention_bias", False))
        return cls(
            family=family,
            num_layers=int(need("num_hidden_layers")),
            hidden_size=hidden,
            ffn_hidden_size=int(need("intermediate_size")),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(need("vocab_size")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_theta=rope_theta,
            rope_scaling_factor=factor,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=family == "qwen3",
            hf_config={k: v for k, v in cfg.items() if k not in ("quantization_config",)},
        )

    def to_hf_config(self) -> dict[str, Any]:
        """An HF config.json for this architecture (the stored original, refreshed from our fields)."""
        cfg = dict(self.hf_config)
        cfg.update(
            architectures=cfg.get("architectures") or [_HF_ARCHITECTURES[self.family]],
            model_type=self.family,
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        if self.family == "llama":
            cfg["attention_bias"] = self.qkv_bias
        if "rope_parameters" in cfg or "rope_theta" not in cfg:
            rp: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
            if self.rope_scaling_factor is not None:
                rp.update(rope_type="llama3", factor=self.rope_scaling_factor, **_LLAMA3_ROPE_DEFAULTS)
            cfg["rope_parameters"] = rp
        else:
            cfg["rope_theta"] = self.rope_theta
        return cfg

    # ------------------------------------------------------------------ Megatron-LM args
    @classmethod
    def from_megatron_args(cls, args: Any, vocab_size: int | None = None) -> "ModelArch":
        """Read the architecture from the ``args`` Namespace Megatron-LM stores in its checkpoints.

        ``vocab_size``: the tokenizer's true vocabulary (Megatron-LM stores only the padded size); when
        omitted, the padded size is taken as the vocabulary.
        """
        a = vars(args) if not isinstance(args, dict) else args

        def get(key: str, default: Any = None, required: bool = False) -> Any:
            v = a.get(key, default)
            if required and v is None:
                raise ConfigError(f"Megatron-LM args in the checkpoint lack {key!r}")
            return v

        if get("num_experts"):
            raise ConfigError("Megatron-LM checkpoint is an MoE model (num_experts set); dense only here")
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
        family = "qwen3" if qk_norm else ("qwen2" if qkv_bias else "llama")
        return cls(
            family=family,
            num_layers=int(get("num_layers", required=True)),
            hidden_size=hidden,
            ffn_hidden_size=int(get("ffn_hidden_size", required=True)),
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=int(get("kv_channels") or hidden // heads),
            vocab_size=int(vocab_size or padded),
            max_position_embeddings=int(get("max_position_embeddings") or get("seq_length") or 4096),
            rope_theta=float(get("rotary_base", 10000)),
            rope_scaling_factor=float(get("rope_scaling_factor", 8.0)) if get("use_rope_scaling") else None,
            norm_eps=float(get("norm_epsilon", 1e-5)),
            tie_word_embeddings=not bool(get("untie_embeddings_and_output_weights", False)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            make_vocab_size_divisible_by=int(get("make_vocab_size_divisible_by", 128)),
        )
