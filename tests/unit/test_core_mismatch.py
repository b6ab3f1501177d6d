"""Masked importance sampling (loss.mismatch = mis_token / mis_sequence): hand-computed weights, losses, gradients
and counts; TIS unchanged; band validation.

The policy side is test_core_loss.py's: eps_low 0.2, eps_high 0.28, old log-prob -1, per valid token

    seq 0, A = +1: pg = -1.28 (clipped, grad 0), -0.5 (grad -0.5), -1.1 (grad -1.1)
    seq 1, A = -2: pg = 1.6 (clipped, grad 0), 3.0 (grad 3.0), padding

and the train/rollout ratio r = pi_old / pi_rollout is set per token through the rollout log-probs.
"""
import math

import pytest
import torch

from megatron_pz.algo.loss import LossConfig, policy_loss
from megatron_pz.algo.mismatch import check_band, masked_is_weights
from megatron_pz.config import load_config
from megatron_pz.errors import ConfigError

RATIOS = [[1.5, 0.5, 1.1], [0.5, 1.5, 1.0]]  # pi_theta / pi_old, as in test_core_loss.py
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)


def inputs(mismatch_ratios):
    """logp, old, rollout for the given pi_old / pi_rollout ratios; the padding's rollout log-prob is NaN."""
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(RATIOS, dtype=torch.float64))).requires_grad_(True)
    rollout = old - torch.log(torch.tensor(mismatch_ratios, dtype=torch.float64))
    rollout[1, 2] = float("nan")
    return logp, old, rollout


def test_token_mode_drops_tokens_outside_the_band_and_keeps_the_ratio_inside():
    # r per valid token: 1.0, 3.0, 0.4 (< 0.5: dropped), 1.2, 6.0 (> 5: dropped)
    logp, old, rollout = inputs([[1.0, 3.0, 0.4], [1.2, 6.0, 1.0]])
    cfg = LossConfig(mismatch="mis_token", mismatch_band=[0.5, 5.0])
    loss, m = policy_loss(logp, old, ADV, MASK, 10.0, cfg, rollout_logprobs=rollout)
    # (1 * -1.28 + 3 * -0.5 + 0 * -1.1 + 1.2 * 1.6 + 0 * 3.0) / 10 = (-1.28 - 1.5 + 1.92) / 10
    assert loss.item() == pytest.approx(-0.086)
    loss.backward()
    # only unclipped, kept tokens carry gradient: (0, 1) with weight 3; (0, 2) and (1, 1) are dropped
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 3 * -0.5 / 10, 0.0, 0.0, 0.0, 0.0])
    assert m["mis_weight_mean"].item() == pytest.approx((1.0 + 3.0 + 1.2) / 5)
    assert (m["mis_masked_tokens"].item(), m["mis_masked_seqs"].item(), m["mis_seqs"].item()) == (2, 2, 2)
    assert m["mismatch_abs_max"].item() == pytest.approx(math.log(6.0))  # today's metrics stay
    assert "tis_weight_mean" not in m


def test_sequence_mode_uses_the_geometric_mean_of_the_ratios():
    # seq 0: r = 2, 2, 2 -> geometric mean 2 (kept, weight 2 on each token);
    # seq 1: r = 4, 16   -> geometric mean sqrt(64) = 8 > 5 (the whole sequence dropped)
    logp, old, rollout = inputs([[2.0, 2.0, 2.0], [4.0, 16.0, 1.0]])
    cfg = LossConfig(mismatch="mis_sequence", mismatch_band=[0.5, 5.0])
    loss, m = policy_loss(logp, old, ADV, MASK, 10.0, cfg, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(2 * (-1.28 - 0.5 - 1.1) / 10)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 2 * -0.5 / 10, 2 * -1.1 / 10, 0.0, 0.0, 0.0])
    assert m["mis_weight_mean"].item() == pytest.approx(2 * 3 / 5)
    assert (m["mis_masked_tokens"].item(), m["mis_masked_seqs"].item(), m["mis_seqs"].item()) == (2, 1, 2)
    # token mode on the same ratios drops only the 16 (4 is inside [0.5, 5]), and no whole sequence
    logp2, _, _ = inputs([[2.0, 2.0, 2.0], [4.0, 16.0, 1.0]])
    _, m2 = policy_loss(logp2, old, ADV, MASK, 10.0, LossConfig(mismatch="mis_token"), rollout_logprobs=rollout)
    assert (m2["mis_masked_tokens"].item(), m2["mis_masked_seqs"].item()) == (1, 1)


def test_a_narrow_sequence_band_drops_both_and_the_loss_is_zero():
    logp, old, rollout = inputs([[2.0, 2.0, 2.0], [4.0, 16.0, 1.0]])
    cfg = LossConfig(mismatch="mis_sequence", mismatch_band=[0.9, 1.5])
    loss, m = policy_loss(logp, old, ADV, MASK, 10.0, cfg, rollout_logprobs=rollout)
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.abs().sum().item() == 0.0
    assert (m["mis_masked_tokens"].item(), m["mis_masked_seqs"].item()) == (5, 2)


def test_masked_weights_directly_with_an_empty_row():
    # log r per token; row 1 has no valid token and is no sequence at all; row 0's geometric mean is
    # exp((log 3 + log(1/3) + log 1.5) / 3) = 1.5^(1/3) = 1.1447
    log_ratio = torch.log(torch.tensor([[3.0, 1 / 3, 1.5], [9.0, 9.0, 9.0]], dtype=torch.float64))
    mask = torch.tensor([[True, True, True], [False, False, False]])
    w, m = masked_is_weights(log_ratio, mask, "mis_sequence", (0.5, 2.0))
    assert w[0].tolist() == pytest.approx([1.5 ** (1 / 3)] * 3) and w[1].tolist() == [0.0, 0.0, 0.0]
    assert (m["mis_masked_tokens"].item(), m["mis_masked_seqs"].item(), m["mis_seqs"].item()) == (0, 0, 1)
    w, m = masked_is_weights(log_ratio, mask, "mis_token", (0.5, 2.0))
    assert w.flatten().tolist() == pytest.approx([0.0, 0.0, 1.5, 0.0, 0.0, 0.0])
    assert (m["mis_masked_tokens"].item(), m["mis_masked_seqs"].item()) == (2, 1)
    assert m["mis_weight_mean"].item() == pytest.approx(1.5 / 3)


def test_tis_default_is_the_formula_it_always_was():
    # The default (mismatch=tis, cap 2) computed by hand in the same float operations: bitwise equal.
    logp, old, rollout = inputs([[1.0, 3.0, 0.5], [1.0, 1.2, 1.0]])
    loss, m = policy_loss(logp, old, ADV, MASK, 10.0, LossConfig(), rollout_logprobs=rollout)
    mask = MASK.bool()
    z = torch.zeros((), dtype=torch.float64)
    lp, o = torch.where(mask, logp.detach(), z), torch.where(mask, old, z)
    ratio = torch.exp(lp - o)
    adv = torch.where(mask, ADV[:, None].expand(2, 3), z)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28))
    w = torch.clamp(torch.exp(o - torch.where(mask, rollout, z)), max=2.0)
    assert torch.equal(loss.detach(), torch.where(mask, pg * w, z).sum() / 10.0)
    assert "mis_masked_tokens" not in m and m["tis_clip_frac"].item() == pytest.approx(1 / 5)


@pytest.mark.parametrize("band", [[0.0, 2.0], [1.1, 2.0], [0.5, 0.9], [0.5], [0.5, 2.0, 3.0], ["a", 2.0],
                                  [0.5, float("inf")]])
def test_band_validation_names_the_key(band):
    with pytest.raises(ConfigError, match=r"^loss\.mismatch_band=.*0 < low <= 1 <= high|^loss\.mismatch_band=.*two"):
        check_band(band, "loss.mismatch_band")


def test_band_edges_one_are_allowed():
    assert check_band([1, 1]) == (1.0, 1.0)


@pytest.mark.parametrize("override,match", [
    (["loss.mismatch_band=[2.0, 5.0]"],
     r"overrides: loss\.mismatch_band=\[2\.0, 5\.0\]: expected 0 < low <= 1 <= high"),
    (["loss.mismatch=icepop"], r"overrides: loss\.mismatch='icepop': expected one of tis, mis_token, mis_sequence"),
])
def test_config_errors_are_one_line_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as exc:
        load_config(None, override)
    assert "\n" not in str(exc.value)


def test_config_reads_the_modes():
    c = load_config(None, ["loss.mismatch=mis_sequence", "loss.mismatch_band=[0.99, 1.01]"])
    assert (c.loss.mismatch, c.loss.mismatch_band) == ("mis_sequence", [0.99, 1.01])
    d = load_config(None)
    assert (d.loss.mismatch, d.loss.mismatch_band, d.loss.tis_cap) == ("tis", [0.5, 5.0], 2.0)


def test_step_metrics_sum_the_counts_and_weight_the_means_by_tokens():
    # two micro-batches of one rank: 3 and 1 loss tokens; counts add up, means are token-weighted
    from megatron_pz.trainer.step import _combine, _step_counts

    reports = [{"mis_weight_mean": 1.0, "mis_masked_tokens": 1.0, "mis_masked_seqs": 1.0, "mis_seqs": 2.0,
                "num_tokens": 3.0, "_tokens": 3},
               {"mis_weight_mean": 0.0, "mis_masked_tokens": 1.0, "mis_masked_seqs": 1.0, "mis_seqs": 1.0,
                "num_tokens": 1.0, "_tokens": 1}]
    out = _combine(reports)
    _step_counts(out)  # one process: no data-parallel peers to add
    assert out["train/mis_weight_mean"] == pytest.approx(3 / 4)
    assert (out["train/mis_masked_tokens"], out["train/mis_masked_seqs"], out["train/mis_seqs"]) == (2, 2, 3)
    assert out["train/mis_masked_token_frac"] == pytest.approx(2 / 4)
    assert out["train/mis_masked_seq_frac"] == pytest.approx(2 / 3)
    # a rank whose micro-batches hold no loss token still reports its (zero) counts, for the collective
    empty = _combine([{**reports[1], "mis_masked_tokens": 0.0, "mis_masked_seqs": 0.0, "mis_seqs": 0.0,
                       "_tokens": 0}])
    assert empty == {"train/tokens": 0.0, "train/mis_masked_tokens": 0.0, "train/mis_masked_seqs": 0.0,
                     "train/mis_seqs": 0.0}
