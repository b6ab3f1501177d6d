"""Trainer-side entropy on one rank (TP=1 parallel state), against plain torch.

(token_logprobs goes through Megatron's vocab_parallel_cross_entropy, which needs a real process group; it is
checked end to end by the on-policy tests: tests/e2e/test_train_e2e.py, tests/distributed/test_engine_vs_megatron.py.)
"""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def tp1_state():
    from unittest import mock

    from megatron.core import parallel_state as ps

    with mock.patch.object(ps, "get_tensor_model_parallel_world_size", return_value=1), \
         mock.patch.object(ps, "get_tensor_model_parallel_rank", return_value=0), \
         mock.patch.object(ps, "get_tensor_model_parallel_group", return_value=None):
        yield


def test_entropy_chunked_equals_full_and_ignores_padded_vocab():
    from megatron_pz.trainer.logprobs import scaled_logits, token_entropy

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 12)
    z = scaled_logits(logits, vocab_size=10, temperature=0.7)  # 2 padded rows -> -inf
    ref = torch.distributions.Categorical(logits=logits[..., :10] / 0.7).entropy()
    for chunk in (1, 4, 1024):
        assert torch.allclose(token_entropy(z, chunk_rows=chunk), ref, atol=1e-5)


def test_entropy_finite_flag_skips_the_guard_without_changing_values():
    from megatron_pz.trainer.logprobs import scaled_logits, token_entropy

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 16)
    z = scaled_logits(logits, vocab_size=16, temperature=1.3)  # no padded rows: all finite
    assert torch.allclose(token_entropy(z, finite=True), token_entropy(z), atol=1e-6)


def test_response_window_picks_exactly_the_loss_positions():
    from megatron_pz.trainer.step import response_window

    mask = torch.zeros(3, 10)
    mask[0, 2:6] = 1  # 4 response positions
    mask[1, 7:9] = 1  # 2
    # row 2: all masked (a padded row)
    rows, cols, valid = response_window(mask)
    assert rows.shape == cols.shape == valid.shape == (3, 4)
    picked = mask[rows, cols] * valid
    assert picked.sum() == mask.sum() and bool((picked == valid.float()).all())
    assert cols[0].tolist() == [2, 3, 4, 5] and cols[1, :2].tolist() == [7, 8] and valid[1].tolist() == [1, 1, 0, 0]
    x = torch.randn(3, 10)
    assert torch.equal(torch.sort(x[rows[valid], cols[valid]]).values, torch.sort(x[mask > 0]).values)
    full = torch.ones(2, 4)
    assert response_window(full) is None  # nothing to trim
