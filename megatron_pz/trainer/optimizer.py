"""Wrap model chunks for training: Megatron DDP, Megatron (distributed) optimizer, LR scheduler.

This mirrors what Megatron-LM's ``training.setup_model_and_optimizer`` does, without its global args:
token-level loss normalisation is Megatron's own ``calculate_per_token_loss`` path (the loss function returns
a token sum and its count; ``finalize_model_grads`` divides the gradients by the global count over micro-batches
and DP ranks), so the gradient does not depend on how a step is split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TrainingState:
    model: list[torch.nn.Module]  # DDP-wrapped chunks
    optimizer: Any  # MegatronOptimizer
    scheduler: Any  # OptimizerParamScheduler


def setup_training(model_chunks: list[torch.nn.Module], optim_cfg: Any, total_steps: int) -> TrainingState:
    """DDP-wrap ``model_chunks`` and build the optimizer and scheduler (``optim_cfg``: config.OptimConfig)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    tcfg = model_chunks[0].config
    tcfg.calculate_per_token_loss = True
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    ddp = [DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=m,
                                   disable_bucketing=(i > 0)) for i, m in enumerate(model_chunks)]
    for m in ddp:
        m.broadcast_params()  # every DP replica starts from DP rank 0's weights
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1, adam_beta2=optim_cfg.adam_beta2, adam_eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad, bf16=tcfg.bf16, fp16=tcfg.fp16, params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, ddp)
    decay_steps = optim_cfg.lr_decay_steps or total_steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim_cfg.lr_warmup_steps else optim_cfg.lr, max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr, lr_warmup_steps=optim_cfg.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, optim_cfg.lr_warmup_steps + 1), lr_decay_style=optim_cfg.lr_decay_style,
        start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant")
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.finalize_model_grads_func = finalize_model_grads
    return TrainingState(ddp, optimizer, scheduler)
