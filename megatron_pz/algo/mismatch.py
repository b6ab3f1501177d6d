"""Masked importance sampling (MIS): the train/rollout mismatch correction that drops, rather than caps, the
tokens or sequences whose ratio leaves a band.

The rollout engine samples with pi_rollout; the trainer's own log-probs give pi_old. Per response token the
ratio is r_t = pi_old / pi_rollout = exp(old_logp - rollout_logp). ``loss.mismatch`` chooses the correction:

    tis           w_t = min(r_t, tis_cap)                          truncated IS (algo/loss.py; the default)
    mis_token     w_t = r_t if low <= r_t <= high else 0           per token (IcePop; slime's icepop)
    mis_sequence  g_b = exp(mean_t log r_t) over the response,     per sequence, geometric mean of the ratios
                  w_t = g_b if low <= g_b <= high else 0           (verl's rollout_rs=geometric)

A weight of 0 drops the token from the gradient; it still counts in the step's token denominator (as in slime,
whose masked tokens keep their place in the loss mask), so the loss of the kept tokens is not rescaled and the
gradient stays independent of how the step is split into micro-batches. The geometric mean is used for sequences
because the plain product of the ratios drifts with length: a 2000-token response with |log r| ~ 1e-3 per token
would leave any fixed band on the product alone.

Shapes: ``B`` sequences, ``T`` response tokens; ``log_ratio`` and ``mask`` are ``[B, T]``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_pz.errors import ConfigError

MISMATCH_MODES = ("tis", "mis_token", "mis_sequence")
"""``loss.mismatch``: truncated IS (the default), or masked IS per token or per sequence."""

COUNT_METRICS = ("mis_masked_tokens", "mis_masked_seqs", "mis_seqs")
"""Metrics that are counts: summed over micro-batches and data-parallel ranks, never averaged."""


def check_band(band: Sequence[float], key: str = "loss.mismatch_band") -> tuple[float, float]:
    """``[low, high]`` with 0 < low <= 1 <= high, as floats; a one-line ConfigError naming ``key`` otherwise."""
    if not isinstance(band, (list, tuple)) or len(band) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in band):
        raise ConfigError(f"{key}={band!r}: expected [low, high], two numbers")
    low, high = float(band[0]), float(band[1])
    if not (0.0 < low <= 1.0 <= high < float("inf")):
        raise ConfigError(f"{key}={band!r}: expected 0 < low <= 1 <= high (finite)")
    return low, high


def masked_is_weights(log_ratio: torch.Tensor, mask: torch.Tensor, mode: str,
                      band: tuple[float, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked importance weights ``[B, T]`` (0 at dropped and padding positions) and their counts.

    Args:
        log_ratio: [B, T] log pi_old - log pi_rollout, detached; any value at padding (it is ignored there).
        mask: [B, T] bool, the valid response tokens.
        mode: ``mis_token`` or ``mis_sequence``.
        band: (low, high), see ``check_band``.

    Returns:
        ``(weights, metrics)``; metrics are detached scalars: ``mis_weight_mean`` (the mean weight over valid
        tokens, dropped ones counted as 0), and the counts ``mis_masked_tokens`` (valid tokens with weight 0),
        ``mis_masked_seqs`` (sequences with at least one dropped token; in sequence mode, the dropped sequences)
        and ``mis_seqs`` (sequences with at least one valid token).
    """
    low, high = band
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    lr = torch.where(mask, log_ratio.detach(), zero)
    rows = mask.any(dim=-1)  # [B] sequences that have a valid token
    if mode == "mis_token":
        ratio = torch.exp(lr)  # [B, T]
        keep = mask & (ratio >= low) & (ratio <= high)
        weights = torch.where(keep, ratio, zero)
    elif mode == "mis_sequence":
        n = mask.sum(dim=-1)  # [B]
        geo = torch.exp(lr.sum(dim=-1) / n.clamp(min=1).to(lr.dtype))  # [B] geometric mean of the ratios
        keep_seq = rows & (geo >= low) & (geo <= high)
        keep = mask & keep_seq[:, None]
        weights = torch.where(keep, geo[:, None].expand_as(lr), zero)
    else:
        raise ValueError(f"masked_is_weights: mode must be mis_token or mis_sequence, got {mode!r}")
    dropped = mask & ~keep  # [B, T]
    count = mask.sum().clamp(min=1).to(lr.dtype)
    metrics = {
        "mis_weight_mean": (weights.sum() / count).detach(),
        "mis_masked_tokens": dropped.sum().to(lr.dtype).detach(),
        "mis_masked_seqs": (dropped.any(dim=-1) & rows).sum().to(lr.dtype).detach(),
        "mis_seqs": rows.sum().to(lr.dtype).detach(),
    }
    return weights.detach(), metrics
