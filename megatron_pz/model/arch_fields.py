"""The fields of ``ModelArch``, what derives from them and their validation, with no HF or Megatron-LM format.

``model.arch`` adds the readers and writers of HF ``config.json`` (``model.arch_hf``) and Megatron-LM ``args``
(``model.arch_megatron``) on top; those two modules take an ``ArchFields``, so neither imports ``model.arch``
and the three form no import circle. Import ``ModelArch`` from ``model.arch``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from megatron_pz.errors import ConfigError

# The supported families (each HF ``model_type`` that maps to one is in ``model.arch_hf.SUPPORTED_MODEL_TYPES``).
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "smollm3")

_Arch = TypeVar("_Arch", bound="ArchFields")  # from_dict on ModelArch returns a ModelArch


@dataclass
class ArchFields:
    """Architecture hyper-parameters of a GPT-style decoder (Llama/Qwen2/Qwen3/SmolLM3/Qwen3-MoE); use ``ModelArch``."""

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
    # Linear position interpolation (HF rope_type "linear", Megatron's seq_len_interpolation_factor, Megatron-LM's
    # --rotary-seq-len-interpolation-factor): positions are divided by this factor. None = no interpolation.
    rope_interpolation_factor: float | None = None
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
    # Embedding rows a Megatron-LM checkpoint was saved with (its padded_vocab_size): the model keeps at least
    # these, so it loads and saves the same rows whatever the true vocabulary pads to. None = vocab_size.
    min_padded_vocab_size: int | None = None
    # The original HF config.json (without weights-specific entries), kept so export reproduces it.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ derived
    def padded_vocab_size(self, tp: int) -> int:
        """Megatron-LM's rule: round the vocab up to a multiple of make_vocab_size_divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(max(self.vocab_size, self.min_padded_vocab_size or 0) / multiple) * multiple)

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
        if self.family not in FAMILIES:
            raise ConfigError(f"unsupported model family {self.family!r}; supported: {sorted(FAMILIES)}")
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
        f = self.rope_interpolation_factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 1.0):
            raise ConfigError(f"rope_interpolation_factor must be a number > 1 (or null), got {f!r}")
        if f is not None and self.rope_scaling_factor is not None:
            raise ConfigError("a model cannot use both Llama-3 rope scaling (rope_scaling_factor) and linear "
                              "position interpolation (rope_interpolation_factor)")
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
    def from_dict(cls: type[_Arch], d: dict[str, Any]) -> _Arch:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown model architecture fields: {sorted(unknown)}")
        return cls(**d)
