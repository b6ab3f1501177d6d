"""Wrap model chunks for training: Megatron DDP, Megatron (distributed) optimizer, LR scheduler.

This mirrors what Megatron-LM's ``training.setup_model_and_optimizer`` does, without its global args:
token-level loss normalisation is Megatron's own ``calculate_per_token_loss`` path (the loss function returns
a token sum and its count; ``finalize_model_grads`` divides the gradients by the global count over micro-batches
and DP ranks), so the gradient does not depend on how a step is split.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megatron_pz.parallel import is_rank0

# the resume warnings keep the checkpointer's logger name, where they were logged before
logger = logging.getLogger("megatron_pz.trainer.checkpointer")


@dataclass
class TrainingState:
    model: list[torch.nn.Module]  # DDP-wrapped chunks
    optimizer: Any  # MegatronOptimizer
    scheduler: Any  # OptimizerParamScheduler


def setup_training(model_chunks: list[torch.nn.Module], optim_cfg: Any, total_steps: int) -> TrainingState:
    """DDP-wrap ``model_chunks`` and build the optimizer and scheduler (``optim_cfg``: config.OptimConfig)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    tcfg = model_chunks[0].config
    tcfg.calculate_per_token_loss = True
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
        # Off: Megatron's check raises on the rank that sees a NaN, before the gradient collective, and the
        # other ranks wait in it. trainer/step.py checks loss and gradients after it, agreed by every rank, and
        # skips the step (train.max_nonfinite_steps).
        check_for_nan_in_grad=False,
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
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.finalize_model_grads_func = finalize_model_grads
    return TrainingState(ddp, optimizer, scheduler)


def build_scheduler(optimizer: Any, optim_cfg: Any, total_steps: int) -> Any:
    """Megatron's ``OptimizerParamScheduler`` for ``optim_cfg`` over ``total_steps`` (``optim.lr_decay_steps``
    overrides the decay length); ``optimizer``: anything with ``param_groups``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = optim_cfg.lr_decay_steps or total_steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim_cfg.lr_warmup_steps else optim_cfg.lr, max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr, lr_warmup_steps=optim_cfg.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, optim_cfg.lr_warmup_steps + 1), lr_decay_style=optim_cfg.lr_decay_style,
        start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant")


SCHEDULE_KEYS = {"max_lr": "optim.lr", "min_lr": "optim.min_lr", "lr_warmup_steps": "optim.lr_warmup_steps",
                 "lr_decay_steps": "optim.lr_decay_steps (default train.steps)",
                 "lr_decay_style": "optim.lr_decay_style", "start_wd": "optim.weight_decay",
                 "end_wd": "optim.weight_decay", "wd_incr_steps": "optim.lr_decay_steps (default train.steps)"}
"""The scheduler fields a run's config sets, with the key that sets each (``OptimizerParamScheduler.state_dict``)."""


def restore_scheduler(scheduler: Any, saved: Mapping[str, Any]) -> list[str]:
    """Continue a checkpoint's LR schedule at its step count, on the schedule this run's config built.

    The config decides the schedule and the checkpoint only where on it the run is, as Megatron-LM does with
    ``--override-opt_param-scheduler``. So extending a finished run (``train.steps`` 2 -> 3) decays over the new
    total instead of running the added steps at the old schedule's end (min_lr, 0 by default), and changing
    ``optim.lr`` on resume takes effect. Returns the fields that differ from the checkpoint's, as
    ``"lr_decay_steps 2 -> 3 (optim.lr_decay_steps (default train.steps))"``, for the caller's notice.
    """
    current = scheduler.state_dict()
    changed = [f"{k} {saved[k]} -> {current[k]} ({key})" for k, key in SCHEDULE_KEYS.items()
               if k in saved and saved[k] != current[k]]
    before = scheduler.override_opt_param_scheduler
    scheduler.override_opt_param_scheduler = True  # keep our values, take only num_steps from the checkpoint
    try:
        scheduler.load_state_dict(dict(saved))
    finally:
        scheduler.override_opt_param_scheduler = before
    return list(dict.fromkeys(changed))


class ScheduleState:
    """The LR schedule as a checkpoint part (trainer/checkpointer.py): saved as Megatron's scheduler state, restored
    as the checkpoint's step count on this config's schedule (``restore_scheduler``), with one warning line when
    the schedule changed and one when the steps still to run would all be at lr 0."""

    def __init__(self, training: TrainingState, optim_cfg: Any, total_steps: int):
        self.training, self.optim_cfg, self.total_steps = training, optim_cfg, total_steps

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.training.scheduler.state_dict()}

    def load_state_dict(self, meta: Mapping[str, Any]) -> None:
        scheduler, step = self.training.scheduler, int(meta["step"])
        changed = restore_scheduler(scheduler, meta["scheduler"])
        rank0 = is_rank0()
        if changed and rank0:
            logger.warning("LR schedule changed since the checkpoint: %s; continuing after step %d on this config's "
                           "schedule", ", ".join(changed), step)
        steps_left = self.total_steps - step
        lr = scheduler.get_lr(self.training.optimizer.param_groups[0])
        if steps_left > 0 and lr == 0.0 and rank0:
            logger.warning("the LR schedule is at lr 0 after step %d (optim.lr_decay_steps=%s, optim.min_lr=%s): the "
                           "%d step(s) left will not change the weights", step, self.optim_cfg.lr_decay_steps,
                           self.optim_cfg.min_lr, steps_left)
