"""Build a Megatron-Core ``GPTModel`` from a ``ModelArch``: TransformerConfig, layer spec, model chunks.

Transformer Engine's spec (FP8-capable) when TE and CUDA are present, Megatron's local spec otherwise.
All parallelism is inside Megatron-Core; this module only reads parallel sizes through ``parallel_state``
to decide which pipeline stage builds the embedding and the output layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megatron_pz import device
from megatron_pz.errors import ConfigError
from megatron_pz.model.arch import ModelArch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    """How to instantiate the policy (the architecture itself comes from the checkpoint / HF config)."""

    # fp32 | bf16 | fp16: parameter and compute dtype (bf16 is the GPU default; CPU parity tests use fp32).
    dtype: str = "bf16"
    # auto = Transformer Engine spec when TE + CUDA are importable, else Megatron's local spec.
    transformer_impl: str = "auto"  # auto | transformer_engine | local
    # FP8 (TE only): recipe name passed through to TransformerConfig; None disables FP8.
    fp8: str | None = None  # e4m3 | hybrid
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    # Activation recomputation: None | "selective" | "full" (full uses recompute_method/num_layers).
    recompute_granularity: str | None = None
    recompute_method: str | None = None  # uniform | block
    recompute_num_layers: int | None = None
    # Extra TransformerConfig fields, passed through verbatim (escape hatch for Megatron options).
    transformer_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.transformer_impl not in ("auto", "transformer_engine", "local"):
            raise ConfigError(f"model.transformer_impl must be auto, transformer_engine or local, "
                              f"got {self.transformer_impl!r}")
        if self.fp8 not in (None, "e4m3", "hybrid"):
            raise ConfigError(f"model.fp8 must be null, e4m3 or hybrid, got {self.fp8!r}")
        if self.fp8_recipe not in ("delayed", "tensorwise", "mxfp8", "blockwise"):
            raise ConfigError(f"model.fp8_recipe {self.fp8_recipe!r} unknown")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ConfigError(f"model.recompute_granularity must be null, selective or full")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def transformer_engine_available() -> bool:
    """True when TE imports and CUDA is present (TE needs both)."""
    if not device.cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(cfg: ModelConfig) -> bool:
    if cfg.transformer_impl == "local":
        return False
    available = transformer_engine_available()
    if cfg.transformer_impl == "transformer_engine" and not available:
        raise ConfigError("model.transformer_impl=transformer_engine but Transformer Engine (with CUDA) "
                          "is not importable; install the [gpu] extra or use transformer_impl=auto")
    return available


def build_transformer_config(arch: ModelArch, cfg: ModelConfig, parallel: Any | None = None) -> Any:
    """Map the architecture + run options to Megatron's ``TransformerConfig``.

    ``parallel`` is a ``ParallelConfig`` (or None for TP=PP=1).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel.tensor_model_parallel_size if parallel else 1
    pp = parallel.pipeline_model_parallel_size if parallel else 1
    cp = parallel.context_parallel_size if parallel else 1
    ep = parallel.expert_model_parallel_size if parallel else 1
    arch.validate_parallel(tp, pp, cp, ep)
    te = use_transformer_engine(cfg)
    if cfg.fp8 and not te:
        raise ConfigError("model.fp8 needs Transformer Engine on CUDA (transformer_impl=auto on a GPU node)")
    on_gpu = device.cuda_available()
    dtype = cfg.torch_dtype
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        # RL wants a deterministic policy: the logprobs the loss sees must be those the sampler saw.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        sequence_parallel=bool(parallel and parallel.sequence_parallel),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA (torch.compile / apex / TE); off on CPU, Megatron defaults on GPU.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=on_gpu and te,
        gradient_accumulation_fusion=False,  # needs apex/TE fused wgrad; Megatron-LM enables it explicitly
        cross_entropy_loss_fusion=False,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
    )
    if cfg.fp8:
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe, fp8_margin=cfg.fp8_margin,
                      fp8_amax_history_len=cfg.fp8_amax_history_len,
                      fp8_amax_compute_algo=cfg.fp8_amax_compute_algo)
    kwargs.update(cfg.transformer_overrides)
    try:
        return TransformerConfig(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid TransformerConfig option: {exc}") from None


def layer_spec(arch: ModelArch, cfg: ModelConfig) -> Any:
    """Megatron ``ModuleSpec`` for one decoder layer."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine(cfg):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=arch.qk_norm, fp8=cfg.fp8)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def model_provider(arch: ModelArch, cfg: ModelConfig, transformer_config: Any, *, pre_process: bool = True,
                   post_process: bool = True, vp_stage: int | None = None) -> torch.nn.Module:
    """One GPTModel chunk (a pipeline stage). Signature mirrors Megatron-LM's ``model_provider``."""
    from megatron.core.models.gpt import GPTModel

    tp = transformer_config.tensor_model_parallel_size
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=layer_spec(arch, cfg),
        vocab_size=arch.padded_vocab_size(tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-sharded across TP; logprobs are computed vocab-parallel
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )


def build_model(arch: ModelArch, cfg: ModelConfig, parallel: Any | None = None) -> list[torch.nn.Module]:
    """The model chunks this rank owns (one chunk without virtual pipelining), on the training device.

    Must be called after ``parallel.init_distributed``. Returns a list for Megatron's schedules.
    """
    from megatron.core import parallel_state

    tcfg = build_transformer_config(arch, cfg, parallel)
    model = model_provider(
        arch, cfg, tcfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    model.to(device.default_device())
    return [model]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
