"""One description of a decoder-only architecture, readable from an HF ``config.json`` or Megatron-LM args.

``ModelArch`` is the single source of truth the model provider, the converters and the checkpoints share.
It is a plain dataclass (JSON round-trippable) so it can be stored beside every checkpoint.

Supported families: Llama (incl. SmolLM2), Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), SmolLM3 (Llama
with RoPE skipped on every 4th layer, "NoPE"), and Qwen3-MoE (Qwen3 attention, every MLP a top-k routed mixture
of SwiGLU experts, no shared expert).
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
SUPPORTED_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
                         "smollm3": "smollm3"}

_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM", "smollm3": "SmolLM3ForCausalLM"}

# Megatron-Core's built-in Llama-3 rope scaling only takes `factor`; these are the other values it assumes.
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# transformers' default rope_theta where a config.json omits it and the family's default is not 10000.
_DEFAULT_ROPE_THETA = {"smollm3": 2000000.0}


@dataclass
class ModelArch:
    """Architecture hyper-parameters of a GPT-style decoder (Llama/Qwen2/Qwen3/SmolLM3/Qwen3-MoE)."""

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
    # 0-based indices of the layers that apply no rotary embedding (SmolLM3's "NoPE" layers); empty = all RoPE.
    nope_layers: list[int] = field(default_factory=list)
    # Mixture of experts (Qwen3-MoE); None = dense. Every layer's MLP is then `num_experts` SwiGLU experts of
    # width moe_ffn_hidden_size; a bias-free linear router sends each token to its moe_router_topk best experts.
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int | None = None
    # HF's norm_topk_prob: renormalise the top-k routing probabilities to sum to 1 (Qwen3-30B-A3B: true).
    moe_norm_topk_prob: bool = False
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
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def num_parameters(self) -> int:
        """Parameter count of the HF model (unpadded vocab)."""
        return self._count_parameters(self.num_experts or 1)

    @property
    def num_active_parameters(self) -> int:
        """Parameters one token passes through (= num_parameters for a dense model)."""
        return self._count_parameters(self.moe_router_topk or 1)

    def _count_parameters(self, experts: int) -> int:
        h, L = self.hidden_size, self.num_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        if self.is_moe:
            mlp = experts * 3 * h * self.moe_ffn_hidden_size + self.num_experts * h  # experts + router
        else:
            mlp = 3 * h * self.ffn_hidden_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h

    # ------------------------------------------------------------------ validation
    def validate_parallel(self, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, etp: int | None = None) -> None:
        """Raise ConfigError if this architecture cannot be split this way (before any process starts).

        ``etp``: expert tensor-parallel size (MoE only); None = TP, Megatron's default.
        """
        etp = tp if etp is None else etp
        for name, v in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp), ("expert_model_parallel_size", ep),
                        ("expert_tensor_parallel_size", etp)):
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
        if not self.is_moe and self.ffn_hidden_size % tp:  # MoE models here have no dense MLP
            raise ConfigError(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        if self.num_layers % pp:
            raise ConfigError(
                f"num_layers={self.num_layers} is not divisible by pipeline_model_parallel_size={pp}")
        if not self.is_moe:
            if ep > 1:
                raise ConfigError(f"expert_model_parallel_size={ep} needs an MoE model; {self.family} is dense")
            return
        if self.num_experts % ep:
            raise ConfigError(f"num_experts={self.num_experts} is not divisible by expert_model_parallel_size={ep}")
        if self.moe_ffn_hidden_size % etp:
            raise ConfigError(f"moe_ffn_hidden_size (moe_intermediate_size)={self.moe_ffn_hidden_size} is not "
                              f"divisible by expert_tensor_parallel_size={etp}")

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
        bad = [i for i in self.nope_layers if not (isinstance(i, int) and 0 <= i < self.num_layers)]
        if bad:
            raise ConfigError(f"nope_layers {bad} are not layer indices in [0, {self.num_layers})")
        if (self.family == "qwen3_moe") != self.is_moe:
            raise ConfigError(f"num_experts={self.num_experts} does not fit family {self.family!r} "
                              f"(only qwen3_moe is a mixture of experts)")
        if self.is_moe:
            for name in ("num_experts", "moe_ffn_hidden_size", "moe_router_topk"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ConfigError(f"MoE field {name} must be a positive integer, got {v!r}")
            if self.moe_router_topk > self.num_experts:
                raise ConfigError(f"moe_router_topk (num_experts_per_tok)={self.moe_router_topk} exceeds "
                                  f"num_experts={self.num_experts}")

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
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", _DEFAULT_ROPE_THETA.get(family, 10000.0))))
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
        num_layers = int(need("num_hidden_layers"))
        moe: dict[str, Any] = {}
        if family == "qwen3_moe":
            moe = _read_qwen3_moe(cfg, num_layers, need)
        nope_layers: list[int] = []
        if family == "smollm3":
            nope_layers = _read_smollm3_nope_layers(cfg, num_layers)
        return cls(
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
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            # transformers' default differs per family (SmolLM3 ties, the others do not).
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "smollm3")),
            qkv_bias=qkv_bias,
            qk_norm=family in ("qwen3", "qwen3_moe"),
            nope_layers=nope_layers,
            **moe,
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
        if self.family in ("llama", "smollm3"):
            cfg["attention_bias"] = self.qkv_bias
        if self.family == "smollm3":
            cfg["no_rope_layers"] = [0 if i in self.nope_layers else 1 for i in range(self.num_layers)]
        if self.is_moe:
            # transformers 5 writes num_local_experts, the Hub's Qwen3-MoE configs say num_experts: keep the source's.
            cfg["num_local_experts" if "num_local_experts" in cfg else "num_experts"] = self.num_experts
            cfg.update(moe_intermediate_size=self.moe_ffn_hidden_size, num_experts_per_tok=self.moe_router_topk,
                       norm_topk_prob=self.moe_norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
        if "rope_parameters" in cfg or "rope_theta" not in cfg:
            rp: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
            if self.rope_scaling_factor is not None:
                rp.update(rope_type="llama3", factor=self.rope_scaling_factor, **_LLAMA3_ROPE_DEFAULTS)
            cfg["rope_parameters"] = rp
        else:
            cfg["rope_theta"] = self.rope_theta
        return cfg

    # ------------------------------------------------------------------ Megatron-LM args
    def megatron_lm_extra_args(self) -> dict[str, Any]:
        """Megatron-LM args beyond the Llama-style ones (as --no-rope-freq, --num-experts, ... set them)."""
        extra: dict[str, Any] = {}
        if self.nope_layers:
            extra["no_rope_freq"] = [int(i in self.nope_layers) for i in range(self.num_layers)]
        if self.is_moe:
            extra.update(num_experts=self.num_experts, moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                         moe_router_topk=self.moe_router_topk, moe_router_score_function="softmax",
                         moe_router_pre_softmax=not self.moe_norm_topk_prob, moe_layer_freq=1)
        return extra

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
        return cls(
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
            norm_eps=float(get("norm_epsilon", 1e-5)),
            tie_word_embeddings=not bool(get("untie_embeddings_and_output_weights", False)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            nope_layers=nope_layers,
            **moe,
            make_vocab_size_divisible_by=int(get("make_vocab_size_divisible_by", 128)),
        )


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
