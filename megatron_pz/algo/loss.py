"""Token-level PPO-clip policy loss with clip-higher, truncated importance sampling, optional KL and entropy;
and ``sft_loss``, the teacher-forced cross-entropy of the supervised warm-up (``train.objective=sft_span``).

Shapes: ``B`` sequences (padded), ``T`` response tokens. All per-token tensors are ``[B, T]``; ``advantages`` is
``[B]`` (one per sequence, broadcast over its tokens) or ``[B, T]``.

Per valid token (``loss_mask == 1``), with r = exp(logp - old_logp):

    pg    = max(-A * r, -A * clamp(r, 1 - eps_low, 1 + eps_high))        [PZ Eq. 11; DAPO clip-higher]
    w     = min(exp(old_logp - rollout_logp), tis_cap), detached          truncated IS (rollout engine vs trainer)
            or, with ``mismatch`` mis_token / mis_sequence, the masked IS weight of algo/mismatch.py
    loss  = w * pg + kl_coef * KL(logp, ref_logp) - entropy_coef * H

    total = sum(loss over valid tokens) / num_global_tokens

``num_global_tokens`` is the number of valid tokens of the whole optimizer step: all micro-batches and all DP
ranks together (INFERENCE, method §6 item 5: token-level mean as in DAPO). Summing the gradients of the
micro-batches (and all-reducing with SUM over DP) then gives exactly the gradient of one big batch, however the
step is split. Without TIS (no ``rollout_logprobs`` or ``tis_cap=None``) w = 1. Note: a DP wrapper that
*averages* gradients over ranks (Megatron DDP's default) divides by the DP size on top of this, so scale the
loss by the DP size there (with Megatron's ``calculate_per_token_loss=True`` the schedule divides by the token
count itself: pass ``num_global_tokens=1`` and return the count alongside instead).

``old_logprobs`` is what the PPO ratio is taken against: the trainer's own log-probs recomputed before the
update, or the rollout engine's when recomputation is off (then pass no ``rollout_logprobs``).
Padding may hold any value, even inf/NaN: inputs are zeroed outside the mask before any arithmetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_pz.algo.mismatch import MISMATCH_MODES, check_band, masked_is_weights
from megatron_pz.errors import ConfigError

KL_ESTIMATORS = (None, "k1", "k3")


@dataclass
class LossConfig:
    """Policy-loss hyper-parameters. Defaults: DAPO clip-higher, no KL [PZ §4.1], TIS cap 2."""

    eps_low: float = 0.2
    """Lower clip: ratio >= 1 - eps_low (INFERENCE, method §6 item 4: DAPO's 0.2)."""
    eps_high: float = 0.28
    """Upper clip: ratio <= 1 + eps_high (INFERENCE, method §6 item 4: DAPO's 0.28; "clip-higher")."""
    kl: str | None = None
    """KL-to-reference estimator: None (off, as in the paper), "k1" (logp - ref) or "k3" (Schulman's unbiased)."""
    kl_coef: float = 0.0
    """Weight of the KL term; must be 0 when ``kl`` is None."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0 = entropy only logged; needs an ``entropy`` tensor with grad when > 0)."""
    tis_cap: float | None = 2.0
    """Truncated importance sampling cap C in min(pi_old / pi_rollout, C); None disables TIS (mismatch=tis only)."""
    mismatch: str = "tis"
    """The train/rollout mismatch correction (algo/mismatch.py): tis (capped at tis_cap), mis_token (tokens whose
    ratio leaves mismatch_band are dropped, IcePop) or mis_sequence (sequences whose geometric-mean ratio leaves it)."""
    mismatch_band: list[float] = field(default_factory=lambda: [0.5, 5.0])
    """[low, high] of the ratios the mis_* modes keep, 0 < low <= 1 <= high (IcePop's [0.5, 5]); unused by tis."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps_low < 1.0:
            raise ConfigError(f"LossConfig.eps_low={self.eps_low!r}: expected 0 <= eps_low < 1")
        if not self.eps_high >= 0.0:
            raise ConfigError(f"LossConfig.eps_high={self.eps_high!r}: expected >= 0")
        if self.kl not in KL_ESTIMATORS:
            raise ConfigError(f"LossConfig.kl={self.kl!r}: expected one of {KL_ESTIMATORS}")
        if self.kl_coef < 0 or (self.kl is None and self.kl_coef != 0):
            raise ConfigError(f"LossConfig.kl_coef={self.kl_coef!r}: expected >= 0, and 0 when kl is None")
        if self.entropy_coef < 0:
            raise ConfigError(f"LossConfig.entropy_coef={self.entropy_coef!r}: expected >= 0")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ConfigError(f"LossConfig.tis_cap={self.tis_cap!r}: expected > 0 or None")
        if self.mismatch not in MISMATCH_MODES:
            raise ConfigError(f"LossConfig.mismatch={self.mismatch!r}: expected one of {', '.join(MISMATCH_MODES)}")
        self.mismatch_band = list(check_band(self.mismatch_band, "LossConfig.mismatch_band"))


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, else 0 (no NaN/inf from padding can leak into sums or gradients)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def global_token_denominator(num_global_tokens: float | torch.Tensor, n_local: torch.Tensor,
                             dtype: torch.dtype) -> float | torch.Tensor:
    """What a micro-batch's token sum is divided by: the step's global valid-token count (at least 1).

    An on-device count (e.g. all-reduced) stays on device, no host sync; when it is 0 the masked sum is 0 as well.
    A host count of 0 is an error only if this micro-batch has valid tokens (the caller miscounted).
    """
    if isinstance(num_global_tokens, torch.Tensor):
        return num_global_tokens.detach().to(dtype).clamp(min=1.0)
    if num_global_tokens <= 0 and bool(n_local > 0):
        raise ValueError("num_global_tokens must count this micro-batch's valid tokens, got 0")
    return float(num_global_tokens) if num_global_tokens > 0 else 1.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from samples of pi: k1 = logp - ref, k3 = e^(ref-logp) - (ref-logp) - 1."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    num_global_tokens: float | torch.Tensor,
    cfg: LossConfig,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss of one micro-batch, normalised by the step's global token count [PZ Eq. 11].

    Args:
        logprobs: [B, T] log pi_theta of the response tokens (requires grad).
        old_logprobs: [B, T] log pi_old for the PPO ratio (no grad).
        advantages: [B] or [B, T] advantages (no grad).
        loss_mask: [B, T] 1 for response tokens that count, 0 for padding / prompt.
        num_global_tokens: valid tokens of the whole step (all micro-batches, all DP ranks); 0 only if none.
            A float, or a scalar tensor already on the device (avoids a host sync).
        cfg: clip / KL / entropy / TIS settings.
        rollout_logprobs: [B, T] log-probs reported by the rollout engine, for TIS / MIS and mismatch metrics.
        ref_logprobs: [B, T] reference-policy log-probs; required when ``cfg.kl`` is set.
        entropy: [B, T] per-token entropy of pi_theta; logged, and a bonus when ``cfg.entropy_coef > 0``.

    Returns:
        ``(loss, metrics)``: scalar loss = sum over this micro-batch's valid tokens / ``num_global_tokens``
        (0 with zero gradients when there are no valid tokens); metrics are detached scalars averaged over
        this micro-batch's valid tokens (``num_tokens`` gives the weight for combining micro-batches), except
        the counts named in ``algo.mismatch.COUNT_METRICS`` (mis_* modes), which are to be summed.
    """
    mask = loss_mask.bool()
    n_local = mask.sum()
    denom = global_token_denominator(num_global_tokens, n_local, logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)

    logp = _masked(logprobs, mask)
    old = _masked(old_logprobs.detach(), mask)
    adv = _masked(advantages.detach().to(logp.dtype), mask)

    # PPO ratio and clip-higher: the clipped branch is active where it gives the larger (pessimistic) loss.
    ratio = torch.exp(logp - old)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)

    metrics: dict[str, torch.Tensor] = {}
    count = n_local.clamp(min=1).to(logp.dtype)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (_masked(x.detach().to(logp.dtype), mask).sum() / count).detach()

    metrics["pg_loss"] = mean(per_token)
    metrics["clip_frac_low"] = mean(((adv < 0) & (ratio < 1.0 - cfg.eps_low)).to(logp.dtype))
    metrics["clip_frac_high"] = mean(((adv > 0) & (ratio > 1.0 + cfg.eps_high)).to(logp.dtype))
    metrics["approx_kl_old"] = mean((ratio - 1.0) - (logp - old))  # k3 estimate of KL(pi_old || pi_theta)

    if rollout_logprobs is not None:
        rollout = _masked(rollout_logprobs.detach(), mask)
        diff = old - rollout
        metrics["mismatch_abs_mean"] = mean(diff.abs())
        metrics["mismatch_abs_max"] = _masked(diff.abs(), mask).max().detach() if diff.numel() else diff.sum()
        if cfg.mismatch != "tis":
            weight, mis = masked_is_weights(diff, mask, cfg.mismatch, (cfg.mismatch_band[0], cfg.mismatch_band[1]))
            per_token = per_token * weight
            metrics.update(mis)
        elif cfg.tis_cap is not None:
            raw_w = torch.exp(diff)
            weight = torch.clamp(raw_w, max=cfg.tis_cap)
            per_token = per_token * weight
            metrics["tis_weight_mean"] = mean(weight)
            metrics["tis_clip_frac"] = mean((raw_w > cfg.tis_cap).to(logp.dtype))

    if cfg.kl is not None:
        if ref_logprobs is None:
            raise ValueError(f"LossConfig.kl={cfg.kl!r} needs ref_logprobs")
        kl = kl_penalty(logp, _masked(ref_logprobs.detach(), mask), cfg.kl)
        metrics["kl_ref"] = mean(kl)
        per_token = per_token + cfg.kl_coef * kl

    if entropy is not None:
        ent = _masked(entropy, mask)
        metrics["entropy"] = mean(ent)
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * ent
    elif cfg.entropy_coef > 0:
        raise ValueError("LossConfig.entropy_coef > 0 needs the entropy tensor")

    loss = _masked(per_token, mask).sum() / denom
    metrics["loss"] = loss.detach()
    metrics["num_tokens"] = n_local.detach().to(logp.dtype)
    return loss, metrics


def sft_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    num_global_tokens: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher-forced cross-entropy on response tokens, normalised by the step's global token count.

    The supervised warm-up (``train.objective=sft_span``; a deviation from PretrainZero, which has no SFT stage,
    modelled on RLPT's SFT cold start [method §5.2]):

        total = -sum(logprobs over valid tokens) / num_global_tokens

    Normalised exactly like ``policy_loss`` (one token-level mean over all micro-batches and DP ranks), so the
    gradient does not depend on how the step is split. With Megatron's ``calculate_per_token_loss`` pass
    ``num_global_tokens=1`` and return the count alongside.

    Args:
        logprobs: [B, T] log pi_theta of the target tokens (requires grad).
        loss_mask: [B, T] 1 for target tokens, 0 for prompt / padding (padding may hold inf/NaN).
        num_global_tokens: valid tokens of the whole step, a float or a scalar tensor.

    Returns:
        ``(loss, metrics)``; metrics are detached means over this micro-batch's valid tokens: ``loss`` (the mean
        negative log-likelihood per token), ``target_logprob`` (its negative), ``target_prob`` (mean probability
        of the target token), ``seq_sure`` (share of sequences whose every target token has probability > 1/2,
        so greedy decoding reproduces the target: how much of it the policy already predicts), ``num_tokens``.
    """
    mask = loss_mask.bool()
    n_local = mask.sum()
    denom = global_token_denominator(num_global_tokens, n_local, logprobs.dtype)
    logp = _masked(logprobs, mask)
    loss = -logp.sum() / denom
    count = n_local.clamp(min=1).to(logp.dtype)
    mean_logp = (logp.detach().sum() / count).detach()
    rows = mask.any(dim=-1)
    sure = (_masked(logp.detach(), mask) > -math.log(2.0)) | ~mask  # every target token with p > 1/2
    seq_sure = (sure.all(dim=-1) & rows).sum().to(logp.dtype) / rows.sum().clamp(min=1).to(logp.dtype)
    metrics = {"loss": -mean_logp, "target_logprob": mean_logp,
               "target_prob": (_masked(torch.exp(logp.detach()), mask).sum() / count).detach(),
               "seq_sure": seq_sure.detach(), "num_tokens": n_local.detach().to(logp.dtype)}
    return loss, metrics
