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


def test_logits_start_is_the_first_loss_position_of_any_row():
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.step import logits_start
    from megatron_pz.types import Sample, Status, Task

    def sample(p, r):
        return Sample(task=Task.MASK_PRED, group_id=f"g{p}", prompt_ids=[1] * p, response_ids=[2] * r,
                      status=Status.COMPLETED, advantage=1.0)

    # prompts of 6 and 4 tokens: their first logits read are at 5 and 3
    (mb,) = build_microbatches([sample(6, 3), sample(4, 1)], micro_batch_size=2)
    assert logits_start(mb) == 3
    mb.loss_mask.zero_()
    assert logits_start(mb) == 0  # no loss token: full logits


class _TinyLM(torch.nn.Module):
    """The part of GPTModel that logits_from touches: ``output_layer`` called on [S, B, H], then [B, S, V]."""

    def __init__(self, **config):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(sequence_parallel=False, context_parallel_size=1, mtp_num_layers=None,
                                      **config)
        self.post_process = True
        self.output_layer = torch.nn.Linear(4, 6, bias=False)

    def forward(self, hidden):  # hidden [S, B, H]
        return self.output_layer(hidden).transpose(0, 1)


class _Wrapper(torch.nn.Module):  # stands for DDP / Float16Module
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def test_logits_from_slices_the_output_layer_input_and_gives_prompt_positions_zero_gradient():
    from megatron_pz.model.logit_window import logits_from

    torch.manual_seed(0)
    model = _Wrapper(_TinyLM())
    hidden = torch.randn(7, 2, 4, requires_grad=True)
    full = model(hidden)  # [2, 7, 6]
    with logits_from(model, 3) as s0:
        part = model(hidden)
    assert s0 == 3 and part.shape == (2, 4, 6)
    assert torch.allclose(part, full[:, 3:], atol=1e-6)
    part.sum().backward()
    assert hidden.grad[:3].abs().max() == 0 and hidden.grad[3:].abs().min() > 0
    assert model(hidden).shape == (2, 7, 6)  # the hook is gone after the block


@pytest.mark.parametrize("config", [{"sequence_parallel": True}, {"context_parallel_size": 2},
                                    {"mtp_num_layers": 1}])
def test_logits_from_declines_layouts_that_split_or_reuse_the_sequence(config):
    from megatron_pz.model.logit_window import logits_from

    model = _TinyLM()
    model.config.__dict__.update(config)
    with logits_from(model, 3) as s0:
        out = model(torch.randn(7, 2, 4))
    assert s0 == 0 and out.shape == (2, 7, 6)


def test_logits_from_is_a_no_op_without_an_output_layer():
    from megatron_pz.model.logit_window import logits_from

    stage = torch.nn.Linear(4, 4)  # a pipeline stage before the last one
    with logits_from(stage, 3) as s0:
        assert stage(torch.randn(7, 2, 4)).shape == (7, 2, 4)
    assert s0 == 0
