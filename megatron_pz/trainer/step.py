"""One optimizer step on a list of micro-batches through Megatron's pipeline schedule.

forward_step (every stage; the last stage's output layer runs from the first response position only,
``model/logit_window.py``; shared-prompt rows add their attention mask and rotary positions,
``trainer/shared_prompt.py``) -> loss_func (last stage: vocab-parallel log-probs -> GRPO policy loss, a token
sum) -> Megatron backward -> finalize_model_grads (DP reduction, / global token count) -> optimizer.step.
One on-policy PPO update per step: the ratio is taken against the trainer's own log-probs of the same forward
(detached), so it is exactly 1 and the engine/trainer mismatch is handled by truncated importance sampling.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from megatron_pz.algo.loss import LossConfig, policy_loss, sft_loss
from megatron_pz.algo.mismatch import COUNT_METRICS
from megatron_pz.errors import TrainingError
from megatron_pz.model.logit_window import logits_from
from megatron_pz.model.rotary_positions import rotary_at
from megatron_pz.model.row_layout import RowLayout
from megatron_pz.trainer.batching import MicroBatch
from megatron_pz.trainer.logprobs import scaled_logits, token_entropy, token_logprobs
from megatron_pz.trainer.routing_replay import after_forward, set_replay, start_replay


def _forward_backward(model: list[torch.nn.Module], microbatches: list[MicroBatch], loss_cfg: LossConfig,
                      vocab_size: int, temperature: float, forward_only: bool,
                      supervised: bool = False) -> list[dict[str, Any]]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pz import device

    dev = device.default_device()

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        start = logits_start(batch)  # on the host copy: no device sync
        mb = batch.to(dev)
        set_replay(chunk, mb.routed_experts)  # MoE routing replay: the engine's experts, or the router's own
        # The output layer runs from the first position whose logit some sample's loss reads (the model computes
        # no logits for the prompt prefix shared by all rows); s0 = 0 when the model declines (SP/CP, MTP).
        # Shared-prompt rows (trainer/shared_prompt.py) bring their attention mask and per-row rotary positions.
        # The segment attention's RowLayout goes in as its table, a small host tensor (model/row_layout.py).
        shared = mb.attention_mask is not None
        mask = mb.attention_mask.table if isinstance(mb.attention_mask, RowLayout) else mb.attention_mask
        with logits_from(chunk, start) as s0, rotary_at(chunk, mb.position_ids if shared else None):
            output = chunk(mb.tokens, mb.position_ids, attention_mask=mask)
        after_forward(chunk, backward=not forward_only)

        def loss_func(logits: torch.Tensor):
            # logits: [B, S - s0, V_pad / TP] on the last stage (positions s0 ..). Only the response tokens enter
            # the loss: gather them first ([N, R, V], the micro-batch's loss view, trainer/batching.py) so that
            # the fp32 copy, temperature, log-softmax and entropy passes over the vocabulary skip every other
            # position. A logit read by several samples (a shared prompt's last position) gets the sum of their
            # gradients in backward.
            logits = logits[mb.rows, (mb.cols - s0).clamp(min=0)]
            labels, loss_mask, rollout = mb.labels, mb.loss_mask, mb.rollout_logprobs
            z = scaled_logits(logits, vocab_size, temperature)
            logp = token_logprobs(z, labels)  # [N, R]
            ent = token_entropy(z.detach(), finite=not _vocab_padded(z, vocab_size))
            # num_global_tokens=1: the loss stays a token sum; Megatron divides by the global count.
            if supervised:  # teacher-forced targets (train.objective=sft_span): cross-entropy, no advantages
                loss, metrics = sft_loss(logp, loss_mask, 1.0)
                metrics["entropy"] = torch.where(loss_mask > 0, ent, 0.0).sum() / loss_mask.sum().clamp(min=1)
            else:
                loss, metrics = policy_loss(logp, logp.detach(), mb.advantages, loss_mask, 1.0, loss_cfg,
                                            rollout_logprobs=rollout, entropy=ent)
            ntok = loss_mask.sum().to(torch.int)
            report = {k: float(v) for k, v in metrics.items()}
            report["_tokens"] = int(ntok)
            if forward_only:  # [N, R], the loss view (callers index with mb.loss_mask)
                report["_logprobs"] = logp.detach()
            return loss, ntok, report

        return output, loss_func

    seq_len = max(mb.tokens.shape[1] for mb in microbatches)
    start_replay(model)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=model,
        num_microbatches=len(microbatches), seq_length=seq_len, micro_batch_size=microbatches[0].tokens.shape[0],
        forward_only=forward_only)


def logits_start(mb: MicroBatch) -> int:
    """The first column of ``[B, S]`` whose logit some sample's loss reads: the least ``cols`` under the loss
    mask (a row of prompt length P needs positions P - 1 onwards). 0 (full logits) without loss tokens."""
    read = mb.cols[mb.loss_mask > 0]
    return int(read.min()) if read.numel() else 0


def _vocab_padded(logits: torch.Tensor, vocab_size: int) -> bool:
    """Whether some rank's vocabulary shard holds Megatron's padding rows (masked to -inf)."""
    from megatron.core import parallel_state as ps

    return logits.shape[-1] * ps.get_tensor_model_parallel_world_size() > vocab_size


def _combine(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Token-weighted means of the per-micro-batch metrics (this rank, last stage); counts are summed."""
    total = sum(r["_tokens"] for r in reports)
    out: dict[str, float] = {"train/tokens": float(total)}
    for k in reports[0]:
        if k in COUNT_METRICS:
            out[f"train/{k}"] = float(sum(r[k] for r in reports))
    if total == 0:
        return out
    for k in reports[0]:
        if not k.startswith("_") and k != "num_tokens" and k not in COUNT_METRICS:
            out[f"train/{k}"] = sum(r[k] * r["_tokens"] for r in reports) / total
    return out


def _step_counts(out: dict[str, float]) -> None:
    """Masked-IS counts of the whole step: summed over the data-parallel group, then the shares
    ``train/mis_masked_token_frac`` (of the step's loss tokens) and ``train/mis_masked_seq_frac`` (of its sequences
    with a loss token). Collective over the DP group of the last pipeline stage; every such rank has the counts
    (``policy_loss`` reports them in every micro-batch when ``loss.mismatch`` is a mis_* mode)."""
    from megatron.core import parallel_state as ps

    from megatron_pz import device

    keys = ["train/tokens", *(f"train/{k}" for k in COUNT_METRICS)]
    t = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device.default_device())
    if torch.distributed.is_initialized() and ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    tokens, masked_tokens, masked_seqs, seqs = t.tolist()
    out.update({"train/mis_masked_tokens": masked_tokens, "train/mis_masked_seqs": masked_seqs, "train/mis_seqs": seqs,
                "train/mis_masked_token_frac": masked_tokens / max(tokens, 1.0),
                "train/mis_masked_seq_frac": masked_seqs / max(seqs, 1.0)})


def compute_gradients(state: Any, microbatches: list[MicroBatch], loss_cfg: LossConfig, vocab_size: int,
                      temperature: float, supervised: bool = False) -> list[dict[str, Any]]:
    """The gradient half of ``train_step``: zero the gradient buffers, forward/backward over all micro-batches,
    then ``finalize_model_grads`` (DP reduction, tied-embedding reduction across PP stages, / global token
    count). Afterwards each parameter's ``main_grad`` holds the gradient of the step's loss, on this rank's
    shard of each DDP bucket when the distributed optimizer reduce-scatters. Collective; no optimizer step.
    Returns the per-micro-batch reports of the last pipeline stage ([] elsewhere)."""
    for m in state.model:
        m.train()
        m.zero_grad_buffer()
    state.optimizer.zero_grad()
    return _forward_backward(state.model, microbatches, loss_cfg, vocab_size, temperature, forward_only=False,
                             supervised=supervised)


def train_step(state: Any, microbatches: list[MicroBatch], loss_cfg: LossConfig, vocab_size: int,
               temperature: float, supervised: bool = False) -> dict[str, float]:
    """Forward/backward over all micro-batches, then one optimizer + scheduler step. Collective.

    ``supervised``: the loss is ``algo.loss.sft_loss`` (teacher-forced cross-entropy on the response tokens, for
    ``train.objective=sft_span``) instead of the GRPO policy loss; everything else is the same step.

    A step in which no rank has a trainable token (DAPO filtered every group) skips forward and backward, and
    steps the optimizer at lr 0: AdamW would otherwise still apply decoupled weight decay on zero gradients
    (docs/results.md measured |dw|/|w| = 7e-7 after 8 such steps). At lr 0 the weights stay bit-identical; the
    step still exists (Adam's count and moment decay), which keeps the optimizer state complete for the
    checkpoint. The scheduler advances, so the learning rate stays a function of the step number.

    ``train/lr`` is the schedule's learning rate of this step, the one its update ran at, on both paths (a skipped
    step logs the schedule's value too, and ``train/update_skipped`` = 1 says that nothing moved).
    """
    if _global_tokens(microbatches) == 0:
        return _empty_step(state)
    lr = state.optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves on to the next one's below)
    reports = compute_gradients(state, microbatches, loss_cfg, vocab_size, temperature, supervised=supervised)
    if not _all_finite(state.model, reports):
        # Every rank agrees (one all-reduce), so all skip together: no optimizer step (Megatron's fp32 optimizer
        # would write the NaN into the weights), no scheduler step, as Megatron-LM does for an update that failed.
        for m in state.model:
            m.zero_grad_buffer()
        state.optimizer.zero_grad()
        return {"train/grad_norm": float("nan"), "train/lr": lr, "train/update_skipped": 1.0,
                "train/nonfinite_skipped": 1.0}
    ok, grad_norm, _ = state.optimizer.step()
    if ok:
        state.scheduler.step(increment=1)
    out = _combine(reports) if reports else {}
    if "train/mis_seqs" in out:
        _step_counts(out)
    out.update({"train/grad_norm": float(grad_norm or 0.0), "train/lr": lr,
                "train/update_skipped": float(not ok), "train/nonfinite_skipped": 0.0})
    return out


def _all_finite(model: list[torch.nn.Module], reports: list[dict[str, Any]]) -> bool:
    """Whether this step's loss and every gradient are finite on every rank (collective: one all-reduce MAX over
    the world). A rank's whole local gradient buffer is checked, so a NaN is seen before any reduce-scatter
    shard of it is used."""
    from megatron_pz import device

    bad = any(k in ("pg_loss", "loss") and not math.isfinite(v) for r in reports for k, v in r.items())
    for m in model:
        for param in m.parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if bad or (grad is not None and not bool(torch.isfinite(grad).all())):
                bad = True
                break
    flag = torch.tensor([int(bad)], dtype=torch.int32, device=device.default_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) == 0


class NonFiniteSteps:
    """Counts steps skipped in a row for NaN/Inf (``train.max_nonfinite_steps``): at the limit the run stops with
    an error naming the steps, before the last one's save. A skipped step changes no weight, optimizer moment or
    LR step, so every checkpoint, also one saved after a skipped step, holds only finite updates."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def record(self, step: int, skipped: bool) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise TrainingError(f"steps {step - self.in_a_row + 1}-{step} all had NaN or Inf in the loss or the "
                                f"gradients (train.max_nonfinite_steps={self.limit}): stopping; they changed no "
                                f"weight, so every checkpoint is intact and the same command resumes from the last "
                                f"(lower optim.lr, or look at the rewards and samples of those steps first)")


def _empty_step(state: Any) -> dict[str, float]:
    """The optimizer step of a batch without trainable tokens: zero gradients at lr 0 (weights unchanged)."""
    for m in state.model:
        m.zero_grad_buffer()
    state.optimizer.zero_grad()
    groups = state.optimizer.param_groups
    lrs = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    try:
        state.optimizer.step()
    finally:
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
    state.scheduler.step(increment=1)
    return {"train/tokens": 0.0, "train/grad_norm": 0.0, "train/lr": lrs[0], "train/update_skipped": 1.0,
            "train/nonfinite_skipped": 0.0}


def _global_tokens(microbatches: list[MicroBatch]) -> int:
    """Loss tokens of this step summed over all ranks (every rank calls train_step, so a world all-reduce)."""
    from megatron_pz import device

    local = sum(int((mb.loss_mask > 0).sum()) for mb in microbatches)
    t = torch.tensor([local], dtype=torch.long, device=device.default_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return int(t.item())


@torch.no_grad()
def forward_logprobs(model: list[torch.nn.Module], microbatches: list[MicroBatch], vocab_size: int,
                     temperature: float) -> list[torch.Tensor]:
    """Trainer log-probs [N, R] per micro-batch, the loss view (index with ``mb.loss_mask``); last stage, []
    elsewhere. For on-policy checks."""
    for m in model:
        m.eval()
    reports = _forward_backward(model, microbatches, LossConfig(), vocab_size, temperature, forward_only=True)
    return [r["_logprobs"] for r in reports]
