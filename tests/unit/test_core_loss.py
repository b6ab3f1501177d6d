"""Policy loss [PZ Eq. 11, DAPO clip-higher, TIS]: hand-computed values, gradients, metrics, micro-batch invariance.

Hand values use eps_low = 0.2, eps_high = 0.28, old log-prob -1 everywhere and ratios r chosen per token:

    seq 0, A = +1: r = 1.5 -> clipped high: pg = -1.28 (grad 0)
                   r = 0.5 -> unclipped (A > 0 only clips above): pg = -0.5 (grad -A r = -0.5)
                   r = 1.1 -> inside: pg = -1.1 (grad -1.1)
    seq 1, A = -2: r = 0.5 -> clipped low: pg = 2 * 0.8 = 1.6 (grad 0)
                   r = 1.5 -> unclipped (pessimistic max): pg = 3.0 (grad -A r = 3.0)
                   padding
    sum = -1.28 - 0.5 - 1.1 + 1.6 + 3.0 = 1.72
"""
import math

import pytest
import torch

from megatron_pz.algo.loss import LossConfig, kl_penalty, policy_loss
from megatron_pz.errors import ConfigError

RATIOS = [[1.5, 0.5, 1.1], [0.5, 1.5, 1.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
PG = [-1.28, -0.5, -1.1, 1.6, 3.0]  # per valid token, in row-major order
VALID = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def flat(rows):
    return [v for row in rows for v in row]


def inputs():
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(RATIOS, dtype=torch.float64))).requires_grad_(True)
    return logp, old


def test_hand_computed_loss_gradient_and_clip_metrics():
    logp, old = inputs()
    loss, m = policy_loss(logp, old, ADV, MASK, 10.0, LossConfig(tis_cap=None))
    assert loss.item() == pytest.approx(1.72 / 10)
    loss.backward()
    expected_grad = [[0.0, -0.5 / 10, -1.1 / 10], [0.0, 3.0 / 10, 0.0]]
    assert logp.grad.flatten().tolist() == pytest.approx(flat(expected_grad))
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert m["num_tokens"].item() == 5
    assert m["pg_loss"].item() == pytest.approx(1.72 / 5)
    ratios = [RATIOS[b][t] for b, t in VALID]
    assert m["approx_kl_old"].item() == pytest.approx(sum((r - 1) - math.log(r) for r in ratios) / 5)


def test_symmetric_clip_differs_from_clip_higher():
    # with eps_high = 0.2 the first token is clipped at 1.2 instead of 1.28
    logp, old = inputs()
    loss, _ = policy_loss(logp, old, ADV, MASK, 10.0, LossConfig(eps_high=0.2, tis_cap=None))
    assert loss.item() == pytest.approx((1.72 + 1.28 - 1.2) / 10)


def test_per_token_advantages_equal_broadcast_sequence_advantages():
    logp, old = inputs()
    a = policy_loss(logp, old, ADV, MASK, 5.0, LossConfig())[0]
    b = policy_loss(logp, old, ADV[:, None].expand(2, 3).clone(), MASK, 5.0, LossConfig())[0]
    assert a.item() == b.item() == pytest.approx(1.72 / 5)


def test_truncated_importance_sampling_and_mismatch_metrics():
    logp, old = inputs()
    # w = exp(old - rollout) per valid token: [1, 3 -> capped at 2, 0.5, 1, 1.2]
    w = [[1.0, 3.0, 0.5], [1.0, 1.2, 1.0]]
    rollout = old - torch.log(torch.tensor(w, dtype=torch.float64))
    loss, m = policy_loss(logp, old, ADV, MASK, 10.0, LossConfig(tis_cap=2.0), rollout_logprobs=rollout)
    capped = [1.0, 2.0, 0.5, 1.0, 1.2]
    assert loss.item() == pytest.approx(sum(c * p for c, p in zip(capped, PG, strict=True)) / 10)  # 2.37 / 10
    assert loss.item() == pytest.approx(0.237)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx(
        flat([[0.0, 2.0 * -0.5 / 10, 0.5 * -1.1 / 10], [0.0, 1.2 * 3.0 / 10, 0.0]]))
    assert m["tis_weight_mean"].item() == pytest.approx(5.7 / 5)
    assert m["tis_clip_frac"].item() == pytest.approx(1 / 5)
    assert m["mismatch_abs_mean"].item() == pytest.approx((math.log(3) + math.log(2) + math.log(1.2)) / 5)
    assert m["mismatch_abs_max"].item() == pytest.approx(math.log(3))
    # tis_cap=None: mismatch still measured, no reweighting
    logp2, _ = inputs()
    loss2, m2 = policy_loss(logp2, old, ADV, MASK, 10.0, LossConfig(tis_cap=None), rollout_logprobs=rollout)
    assert loss2.item() == pytest.approx(0.172) and "tis_weight_mean" not in m2 and "mismatch_abs_max" in m2


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_against_reference(estimator):
    logp, old = inputs()
    ref = old.clone()  # ref log-prob = old log-prob, so ref - logp = -ln r
    cfg = LossConfig(kl=estimator, kl_coef=0.1, tis_cap=None)
    loss, m = policy_loss(logp, old, ADV, MASK, 10.0, cfg, ref_logprobs=ref)
    ratios = [RATIOS[b][t] for b, t in VALID]
    if estimator == "k1":
        kl = [math.log(r) for r in ratios]
        dkl = [1.0] * 5
    else:
        kl = [1 / r + math.log(r) - 1 for r in ratios]
        dkl = [1 - 1 / r for r in ratios]
    assert loss.item() == pytest.approx((1.72 + 0.1 * sum(kl)) / 10)
    assert m["kl_ref"].item() == pytest.approx(sum(kl) / 5)
    loss.backward()
    pg_grad = [0.0, -0.5, -1.1, 0.0, 3.0]
    assert [logp.grad[b, t].item() for b, t in VALID] == pytest.approx(
        [(g + 0.1 * d) / 10 for g, d in zip(pg_grad, dkl, strict=True)])


def test_kl_penalty_estimators_directly():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)


def test_entropy_logged_and_optional_bonus():
    logp, old = inputs()
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]], dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(logp, old, ADV, MASK, 10.0, LossConfig(tis_cap=None), entropy=entropy)
    assert m["entropy"].item() == pytest.approx(15.0 / 5) and loss.item() == pytest.approx(0.172)
    loss, _ = policy_loss(logp, old, ADV, MASK, 10.0, LossConfig(entropy_coef=0.01, tis_cap=None), entropy=entropy)
    assert loss.item() == pytest.approx((1.72 - 0.01 * 15.0) / 10)
    loss.backward()
    assert entropy.grad.flatten().tolist() == pytest.approx(flat([[-0.001] * 3, [-0.001, -0.001, 0.0]]))
    with pytest.raises(ValueError, match="needs the entropy tensor"):
        policy_loss(logp, old, ADV, MASK, 10.0, LossConfig(entropy_coef=0.01))


def test_all_invalid_batch_gives_zero_loss_zero_grad_no_nan():
    logp = torch.tensor([[float("nan"), -1.0], [float("-inf"), 0.5]], requires_grad=True)
    old = torch.tensor([[float("inf"), -1.0], [float("nan"), -3.0]])
    rollout = torch.tensor([[float("nan"), float("-inf")], [1.0, 2.0]])
    ref = torch.full((2, 2), float("nan"))
    entropy = torch.full((2, 2), float("nan"), requires_grad=True)
    mask = torch.zeros(2, 2)
    cfg = LossConfig(kl="k3", kl_coef=0.1, entropy_coef=0.01)
    loss, m = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0, cfg,
                          rollout_logprobs=rollout, ref_logprobs=ref, entropy=entropy)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 2)) and torch.equal(entropy.grad, torch.zeros(2, 2))
    assert all(torch.isfinite(v).all() for v in m.values()) and m["num_tokens"].item() == 0
    # a tensor count of 0 behaves the same
    loss_t, _ = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, torch.tensor(0.0), LossConfig())
    assert loss_t.item() == 0.0


def test_garbage_in_padding_does_not_leak():
    logp, old = inputs()
    old = old.clone()
    old[1, 2] = float("nan")
    adv_tok = ADV[:, None].expand(2, 3).clone()
    adv_tok[1, 2] = float("inf")
    loss, m = policy_loss(logp, old, adv_tok, MASK, 10.0, LossConfig(tis_cap=None))
    loss.backward()
    assert loss.item() == pytest.approx(0.172) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v).all() for v in m.values())


def test_zero_global_count_with_valid_tokens_is_an_error():
    logp, old = inputs()
    with pytest.raises(ValueError, match="num_global_tokens"):
        policy_loss(logp, old, ADV, MASK, 0, LossConfig())


def test_tensor_global_count():
    logp, old = inputs()
    loss, _ = policy_loss(logp, old, ADV, MASK, torch.tensor(10.0), LossConfig(tis_cap=None))
    assert loss.item() == pytest.approx(0.172)


# ---------------------------------------------------------------- split invariance
def toy_batch(seed=0, B=8, T=6, V=7, H=5):
    """A linear 'policy' over random features: logprobs[b, t] = log_softmax(x[b, t] @ W)[token[b, t]]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    mask[3] = 0.0  # one sequence with no valid token at all
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    W0 = torch.randn(H, V, generator=g, dtype=torch.float64)
    old = torch.log_softmax(x @ W0, -1).gather(-1, tokens[..., None])[..., 0]
    rollout = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    W = (W0 + 0.5 * torch.randn(H, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    return x, tokens, mask, adv, old, rollout, W


def grad_of(batch, slices, num_global_tokens, cfg):
    x, tokens, mask, adv, old, rollout, W = batch
    W = W.detach().clone().requires_grad_(True)
    for sl in slices:
        logp = torch.log_softmax(x[sl] @ W, -1).gather(-1, tokens[sl][..., None])[..., 0]
        loss, _ = policy_loss(logp, old[sl], adv[sl], mask[sl], num_global_tokens(sl), cfg,
                              rollout_logprobs=rollout[sl])
        loss.backward()
    return W.grad


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(kl=None, tis_cap=None, eps_high=0.2),
                                 LossConfig(mismatch="mis_token", mismatch_band=[0.8, 1.25]),
                                 LossConfig(mismatch="mis_sequence", mismatch_band=[0.9, 1.1])])
def test_four_micro_batches_give_the_one_batch_gradient(cfg):
    batch = toy_batch()
    n_global = batch[2].sum().item()
    one = grad_of(batch, [slice(0, 8)], lambda sl: n_global, cfg)
    four = grad_of(batch, [slice(i, i + 2) for i in range(0, 8, 2)], lambda sl: n_global, cfg)
    assert torch.allclose(one, four, rtol=1e-12, atol=1e-14) and one.abs().sum() > 0
    # the common mistake, normalising each micro-batch by its own count, gives a different gradient
    local = grad_of(batch, [slice(i, i + 2) for i in range(0, 8, 2)], lambda sl: batch[2][sl].sum().item(), cfg)
    assert not torch.allclose(one, local / 4, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [{"eps_low": 1.0}, {"eps_high": -0.1}, {"kl": "k2"}, {"kl_coef": 0.1}, {"kl": "k1", "kl_coef": -1.0},
     {"entropy_coef": -0.1}, {"tis_cap": 0.0}],
)
def test_loss_config_validation(kwargs):
    field = "kl_coef" if "kl_coef" in kwargs else next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"LossConfig.{field}"):
        LossConfig(**kwargs)


def test_loss_config_defaults():
    cfg = LossConfig(**{})
    assert (cfg.eps_low, cfg.eps_high, cfg.kl, cfg.kl_coef, cfg.entropy_coef, cfg.tis_cap) == (0.2, 0.28, None, 0.0,
                                                                                              0.0, 2.0)
