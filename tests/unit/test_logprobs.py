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
