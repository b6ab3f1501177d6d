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

from megatron_pz import device, dtypes, mcore_compat
from megatron_pz.errors import ConfigError
from megatron_pz.model.arch import ModelArch


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
    # MoE only (Qwen3-MoE). Token dispatcher: alltoall (the usual one with expert parallelism) | allgather.
    # Both work over NCCL and over gloo (torch >= 2.x has all_to_all_single on gloo).
    moe_token_dispatcher: str = "alltoall"
    # Grouped GEMM over each rank's experts (TE GroupedLinear); null = on with Transformer Engine, off otherwise.
    moe_grouped_gemm: bool | None = None
    # Load-balancing auxiliary loss coefficient; 0 = none, so the forward pass is exactly HF's.
    moe_aux_loss_coeff: float = 0.0
    # dtype of the router logits: null = the model dtype (as HF and SGLang compute them, so the trainer routes
    # tokens as the rollout engine did) | fp32 | fp64.
    moe_router_dtype: str | None = None
    # Routing replay (R3): the rollout engine returns the experts it routed each token to and the policy forward
    # routes the same way (Megatron-Core's moe_enable_routing_replay; trainer/routing_replay.py). SGLang servers
    # need --enable-return-routed-experts. See docs/training.md.
    moe_routing_replay: bool = False
    # Extra TransformerConfig fields, passed through verbatim (escape hatch for Megatron options).
    transformer_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:  # either spelling (bf16 / bfloat16); stored as the short name
            self.dtype = dtypes.short_name(self.dtype)
        except ValueError:
            raise ConfigError(f"model.dtype must be one of {sorted(dtypes.SHORT_NAMES)}, got {self.dtype!r}") from None
        if self.transformer_impl not in ("auto", "transformer_engine", "local"):
            raise ConfigError(f"model.transformer_impl must be auto, transformer_engine or local, "
                              f"got {self.transformer_impl!r}")
        if self.fp8 not in (None, "e4m3", "hybrid"):
            raise ConfigError(f"model.fp8 must be null, e4m3 or hybrid, got {self.fp8!r}")
        if self.fp8_recipe not in ("delayed", "tensorwise", "mxfp8", "blockwise"):
            raise ConfigError(f"model.fp8_recipe {self.fp8_recipe!r} unknown")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ConfigError("model.recompute_granularity must be null, selective or full")
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ConfigError(f"model.moe_token_dispatcher must be alltoall or allgather, "
                              f"got {self.moe_token_dispatcher!r}")
        if self.moe_router_dtype not in (None, "fp32", "fp64"):
            raise ConfigError(f"model.moe_router_dtype must be null, fp32 or fp64, got {self.moe_router_dtype!r}")
        if self.moe_aux_loss_coeff < 0:
            raise ConfigError(f"model.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.dtype)


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


def use_grouped_gemm(cfg: ModelConfig) -> bool:
    """Grouped GEMM for the experts: TE's GroupedLinear, so only with Transformer Engine."""
    te = use_transformer_engine(cfg)
    if cfg.moe_grouped_gemm and not te:
        raise ConfigError("model.moe_grouped_gemm=true needs Transformer Engine on CUDA; leave it null on CPU")
    return te if cfg.moe_grouped_gemm is None else cfg.moe_grouped_gemm


def build_transformer_config(arch: ModelArch, cfg: ModelConfig, parallel: Any | None = None, *,
                             training: bool = True, masked_rows: bool = False) -> Any:
    """Map the architecture + run options to Megatron's ``TransformerConfig``.

    ``parallel`` is a ``ParallelConfig`` (or None for TP=PP=1). ``training=False`` (conversion, evaluation)
    lifts the MoE TP>1 => sequence-parallel requirement, which Megatron enforces only in training mode.
    ``masked_rows``: the model will see rows that bring their own attention mask and rotary positions
    (shared-prompt or packed rows, ``trainer/shared_prompt.py``): per-row rotary positions
    (``model/rotary_positions.py``) are not taken by the fused RoPE kernels, so RoPE stays unfused; context
    parallelism is refused (its rotary angles and sequence chunks are split per rank).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel.tensor_model_parallel_size if parallel else 1
    pp = parallel.pipeline_model_parallel_size if parallel else 1
    cp = parallel.context_parallel_size if parallel else 1
    ep = parallel.expert_model_parallel_size if parallel else 1
    etp = parallel.expert_tensor_size if parallel else 1
    sequence_parallel = bool(parallel and parallel.sequence_parallel)
    arch.validate_parallel(tp, pp, cp, ep, etp)
    if masked_rows and cp > 1:
        raise ConfigError(f"train.shared_prompt and train.max_tokens_per_microbatch need parallel."
                          f"context_parallel_size 1, got {cp}: their rows attend through an explicit mask with "
                          "per-row rotary positions, which Megatron-Core's context-parallel attention does not split")
    if arch.is_moe and tp > 1 and not sequence_parallel and training:
        # Megatron's MoELayer refuses to train with TP > 1 and no sequence parallelism; say so before any
        # process group exists rather than at the first training step.
        raise ConfigError(f"an MoE model with tensor_model_parallel_size={tp} needs parallel.sequence_parallel: "
                          f"true (Megatron-Core's MoE layer refuses to train with TP > 1 without it)")
    if cfg.moe_routing_replay and not arch.is_moe:
        raise ConfigError(f"model.moe_routing_replay=true needs a mixture-of-experts model; {arch.family} is dense")
    if cfg.moe_routing_replay and cp > 1:
        raise ConfigError(f"model.moe_routing_replay=true with context_parallel_size={cp}: replaying the routing "
                          f"of context-parallel sequence chunks is not supported")
    te = use_transformer_engine(cfg)
    if sequence_parallel and not te:
        raise ConfigError("parallel.sequence_parallel needs Transformer Engine (a CUDA node): Megatron-Core's local "
                          "spec normalises with torch's RMSNorm, which does not support sequence parallelism")
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
        sequence_parallel=sequence_parallel,
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
        apply_rope_fusion=on_gpu and te and not masked_rows,
        gradient_accumulation_fusion=False,  # needs apex/TE fused wgrad; Megatron-LM enables it explicitly
        cross_entropy_loss_fusion=False,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
    )
    if arch.nope_layers:
        # Megatron's per-layer RoPE switch (1 = skip RoPE), read by Attention.forward via its layer_number.
        kwargs["no_rope_freq"] = [int(i in arch.nope_layers) for i in range(arch.num_layers)]
    if arch.is_moe:
        kwargs.update(_moe_kwargs(arch, cfg, etp))
    if cfg.fp8:
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe, fp8_margin=cfg.fp8_margin,
                      fp8_amax_history_len=cfg.fp8_amax_history_len,
                      fp8_amax_compute_algo=cfg.fp8_amax_compute_algo)
    kwargs.update(cfg.transformer_overrides)
    try:
        return TransformerConfig(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid TransformerConfig option: {exc}") from None


def _moe_kwargs(arch: ModelArch, cfg: ModelConfig, etp: int) -> dict[str, Any]:
    """TransformerConfig MoE fields that reproduce HF's Qwen3-MoE routing exactly.

    HF (Qwen3MoeTopKRouter): p = softmax(x W^T) over all experts in fp32; take the top-k of p; when
    norm_topk_prob, divide them by their sum. Megatron (topk_routing_with_score_function, softmax):
      * pre_softmax=False: top-k of the logits, then softmax over those k logits, which equals
        p_i / sum_{j in top-k} p_j: HF with norm_topk_prob=True (same experts: softmax is monotonic);
      * pre_softmax=True: softmax over all experts, then top-k, unnormalised: HF with norm_topk_prob=False.
    No top-k scaling factor, no expert bias, no groups, no capacity/token dropping, no input jitter.
    """
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_topk_scaling_factor=None,
        moe_router_dtype=cfg.moe_router_dtype,
        # The aux loss only adds a gradient (attached to the probs in training); 0 leaves HF's forward intact.
        moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_token_dispatcher_type=cfg.moe_token_dispatcher,
        moe_grouped_gemm=use_grouped_gemm(cfg),
        expert_tensor_parallel_size=etp,
        moe_enable_routing_replay=cfg.moe_routing_replay,
    )


def layer_spec(arch: ModelArch, cfg: ModelConfig, arbitrary_mask: bool = False,
               segment_attention: bool = False) -> Any:
    """Megatron ``ModuleSpec`` for one decoder layer.

    ``arbitrary_mask``: self-attention takes the caller's ``attention_mask`` (``AttnMaskType.arbitrary``, for
    shared-prompt rows) instead of building its own causal one. Both core attentions honour it: the local
    spec's ``DotProductAttention`` masks with it (torch softmax, or the fused masked-softmax kernel, never the
    causal-only one); Transformer Engine's ``TEDotProductAttention`` selects a backend that takes an arbitrary
    mask (its unfused one where the fused kernels cannot).
    ``segment_attention`` (with ``arbitrary_mask``): the core attention is ``model/segment_attention.
    SegmentAttention``, which computes rows given as a ``RowLayout`` by prompt and response blocks (and a tensor
    mask as ``DotProductAttention``); the projections stay the spec's own (TE's on a GPU).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    experts = arch.num_experts  # None = dense MLP
    if use_transformer_engine(cfg):
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=use_grouped_gemm(cfg) if experts else False,
            qk_layernorm=arch.qk_norm, fp8=cfg.fp8)
        return _with_arbitrary_mask(spec, segment_attention) if arbitrary_mask else spec
    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                                    qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    if arbitrary_mask:
        spec = _with_arbitrary_mask(spec, segment_attention)
    if experts:
        # Dense layers fuse the pre-MLP norm into TE's linear_fc1, and the local spec renames its key to match.
        # An MoE layer has nothing to fuse it into, so TE keeps it as `pre_mlp_layernorm`: drop the rename so
        # local-spec and TE-spec (and Megatron-LM) MoE checkpoints share keys.
        keys_map = dict(spec.submodules.sharded_state_dict_keys_map)
        keys_map.pop("pre_mlp_layernorm.", None)
        spec.submodules.sharded_state_dict_keys_map = keys_map
    return spec


def _with_arbitrary_mask(spec: Any, segment_attention: bool) -> Any:
    """The layer spec with its self-attention built for a caller-given mask (``AttnMaskType.arbitrary``), and
    with ``segment_attention`` the segment core attention."""
    import copy

    from megatron.core.transformer.enums import AttnMaskType

    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.params = {**(attn.params or {}), "attn_mask_type": AttnMaskType.arbitrary}
    if segment_attention:
        from megatron_pz.model.segment_attention import SegmentAttention

        attn.submodules.core_attention = SegmentAttention
    return spec


def model_provider(arch: ModelArch, cfg: ModelConfig, transformer_config: Any, *, pre_process: bool = True,
                   post_process: bool = True, vp_stage: int | None = None,
                   arbitrary_mask: bool = False, segment_attention: bool = False) -> torch.nn.Module:
    """One GPTModel chunk (a pipeline stage). Signature mirrors Megatron-LM's ``model_provider``."""
    from megatron.core.models.gpt import GPTModel

    if arch.is_moe:
        mcore_compat.moe_without_te()
    tp = transformer_config.tensor_model_parallel_size
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=layer_spec(arch, cfg, arbitrary_mask, segment_attention),
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
        seq_len_interpolation_factor=arch.rope_interpolation_factor,
        vp_stage=vp_stage,
    )


def build_model(arch: ModelArch, cfg: ModelConfig, parallel: Any | None = None, *,
                training: bool = True, masked_rows: bool = False,
                segment_attention: bool = False) -> list[torch.nn.Module]:
    """The model chunks this rank owns (one chunk without virtual pipelining), on the training device.

    Must be called after ``parallel.init_distributed``. Returns a list for Megatron's schedules.
    ``training=False`` for models that only run forward passes (see ``build_transformer_config``).
    ``masked_rows``: built for shared-prompt or packed rows (``train.shared_prompt``,
    ``train.max_tokens_per_microbatch``): attention takes the caller's mask, RoPE unfused. Every forward must
    then pass its ``attention_mask``: an arbitrary-mask layer builds no causal mask of its own.
    ``segment_attention`` (with ``masked_rows``): the core attention also takes a ``RowLayout`` as its mask
    (``train.shared_prompt_attention``, ``model/segment_attention.py``).
    """
    from megatron.core import parallel_state

    tcfg = build_transformer_config(arch, cfg, parallel, training=training, masked_rows=masked_rows)
    model = model_provider(
        arch, cfg, tcfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        arbitrary_mask=masked_rows,
        segment_attention=masked_rows and segment_attention,
    )
    model.to(device.default_device())
    return [model]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
