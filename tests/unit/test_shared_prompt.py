"""Shared-prompt rows (trainer/shared_prompt.py): layout by hand, and the context every predicted token sees.

The model-level exactness (loss and every gradient against the unshared layout, TP1/TP2/PP2) is
tests/distributed/test_shared_prompt.py; here the layout itself: tokens, positions, mask and the loss view.
"""
import pytest
import torch

from megatron_pz.model.row_layout import RowLayout, Unit
from megatron_pz.trainer.batching import build_microbatches
from megatron_pz.trainer.shared_prompt import allowed_attention
from megatron_pz.types import Sample, Status, Task


def _sample(group, prompt, response, advantage=1.0, status=Status.COMPLETED):
    return Sample(task=Task.MASK_PRED, group_id=group, prompt_ids=list(prompt), response_ids=list(response),
                  rollout_logprobs=[-0.1 * t for t in response], status=status, advantage=advantage)


def test_one_group_row_by_hand():
    prompt = [11, 12, 13]
    group = [_sample("g", prompt, [21, 22]), _sample("g", prompt, [31, 32, 33]), _sample("g", prompt, [41])]
    (mb,) = build_microbatches(group, micro_batch_size=4, pad_id=0, seq_multiple=5, shared_prompt=True)
    assert mb.tokens.tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 41, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 3, 9]]
    allowed = (~mb.attention_mask[0, 0]).int()
    # rows: queries; columns: keys. Prompt causal; each response sees the prompt and its own past; pad: itself.
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    # first response token of every sample: the prompt's last logit (column 2); then its own positions
    assert mb.cols.tolist() == [[2, 3, 3], [2, 5, 6], [2, 2, 2]]
    assert mb.rows.tolist() == [[0, 0, 0]] * 3
    assert mb.labels.tolist() == [[21, 22, 0], [31, 32, 33], [41, 0, 0]]
    assert mb.loss_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert torch.allclose(mb.rollout_logprobs[1], torch.tensor([-3.1, -3.2, -3.3]))


def _contexts(mb):
    """For every loss token: (label, the (token, position) pairs its logit's position attends to)."""
    out = []
    for n, k in (mb.loss_mask > 0).nonzero().tolist():
        b, c = int(mb.rows[n, k]), int(mb.cols[n, k])
        if mb.attention_mask is None:
            keys = list(range(c + 1))
        else:
            keys = (~mb.attention_mask[b, 0, c]).nonzero().flatten().tolist()
        ctx = tuple((int(mb.tokens[b, j]), int(mb.position_ids[b, j])) for j in keys)
        out.append((int(mb.labels[n, k]), ctx, float(mb.advantages[n]), float(mb.rollout_logprobs[n, k])))
    return sorted(out)


@pytest.mark.parametrize("mbs,same_length", [(2, False), (3, True), (8, False)])
def test_every_predicted_token_sees_the_context_of_its_unshared_row(mbs, same_length):
    g = torch.Generator().manual_seed(0)
    samples = []
    for gi, (p, sizes) in enumerate([(7, [3, 5, 2]), (4, [6, 1]), (9, [2, 2, 4, 3])]):
        prompt = torch.randint(1, 100, (p,), generator=g).tolist()
        for r in sizes:
            samples.append(_sample(f"g{gi}", prompt, torch.randint(100, 200, (r,), generator=g).tolist(),
                                   advantage=float(torch.randn(1, generator=g))))
    samples.append(_sample("g0", samples[0].prompt_ids, [150, 151], status=Status.FILTERED))  # DAPO-dropped
    samples.append(_sample("g1", samples[3].prompt_ids, [152], advantage=None))  # no advantage: not trainable
    ref = build_microbatches(samples, micro_batch_size=mbs, seq_multiple=8, same_length=same_length)
    shared = build_microbatches(samples, micro_batch_size=mbs, seq_multiple=8, same_length=same_length,
                                shared_prompt=True)
    assert sum(int(mb.loss_mask.sum()) for mb in shared) == 3 + 5 + 2 + 6 + 1 + 2 + 2 + 4 + 3
    assert [mb.labels.shape[0] for mb in shared] == [mb.labels.shape[0] for mb in ref]  # mbs samples each
    assert sorted(c for mb in ref for c in _contexts(mb)) == sorted(c for mb in shared for c in _contexts(mb))
    real = lambda mbs_: sum(int((mb.tokens > 0).sum()) for mb in mbs_)  # noqa: E731 (pad id 0, tokens >= 1)
    assert real(shared) < real(ref)  # each prompt once per micro-batch instead of once per sample
    if same_length:  # fixed [B, S] under pipeline parallelism
        assert len({tuple(mb.tokens.shape) for mb in shared}) == 1


def _three_groups():
    g = torch.Generator().manual_seed(3)
    samples = []
    for gi, (p, sizes) in enumerate([(7, [3, 5, 2]), (4, [6, 1]), (9, [2, 2, 4, 3])]):
        prompt = torch.randint(1, 100, (p,), generator=g).tolist()
        for r in sizes:
            samples.append(_sample(f"g{gi}", prompt, torch.randint(100, 200, (r,), generator=g).tolist(),
                                   advantage=float(torch.randn(1, generator=g))))
    samples.append(_sample("g0", samples[0].prompt_ids, [150, 151], status=Status.FILTERED))  # DAPO-dropped
    return samples


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("budget,same_length", [(16, False), (24, True), (200, False)])
def test_packed_rows_keep_every_context_and_the_budget(shared, budget, same_length):
    samples = _three_groups()
    ref = build_microbatches(samples, micro_batch_size=2, seq_multiple=8)
    packed = build_microbatches(samples, micro_batch_size=2, seq_multiple=8, same_length=same_length,
                                shared_prompt=shared, max_tokens=budget)
    assert sorted(c for mb in ref for c in _contexts(mb)) == sorted(c for mb in packed for c in _contexts(mb))
    real = [int((mb.tokens > 0).sum()) for mb in packed]  # pad id 0, tokens >= 1
    assert all(mb.tokens.shape[0] == 1 for mb in packed) and max(real) <= budget
    # no padding but each row's tail (to the multiple of 8, or to the longest row under same_length)
    width = max(real) if same_length else None
    assert all(mb.tokens.shape[1] == -(-(width or n) // 8) * 8 for mb, n in zip(packed, real))
    if not shared:  # every sample's prompt and response once
        assert sum(real) == sum(s.num_tokens for s in samples if s.trainable)
    if budget == 200:  # everything fits one row
        assert len(packed) == 1


def _real_columns(mb) -> torch.Tensor:
    """``[B, S]`` bool: the columns of the micro-batch's units (everything but padding)."""
    real = torch.zeros(mb.tokens.shape, dtype=torch.bool)
    for u in mb.layout.unit_list():
        real[u.row, u.start:u.start + u.length] = True
    return real


@pytest.mark.parametrize("layout", [dict(shared_prompt=True), dict(max_tokens=24),
                                    dict(shared_prompt=True, max_tokens=24)])
@pytest.mark.parametrize("same_length", [False, True])
def test_segment_attention_gets_the_layout_of_the_dense_mask(layout, same_length):
    """``attention="segments"``: the same rows and loss view, the ``RowLayout`` in place of the ``[B, 1, S, S]``
    mask; its units cover the real columns and its allowed pairs are the dense mask's between them."""
    samples = _three_groups()
    dense = build_microbatches(samples, micro_batch_size=3, seq_multiple=8, same_length=same_length, **layout)
    seg = build_microbatches(samples, micro_batch_size=3, seq_multiple=8, same_length=same_length,
                             attention="segments", **layout)
    assert len(seg) == len(dense)
    for d, s in zip(dense, seg):
        assert isinstance(s.attention_mask, RowLayout) and s.attention_mask is s.layout
        assert (s.layout.rows, s.layout.seq_len) == tuple(d.tokens.shape)
        for name in ("tokens", "position_ids", "rows", "cols", "labels", "loss_mask"):
            assert torch.equal(getattr(s, name), getattr(d, name)), name
        assert s.layout.unit_list() == d.layout.unit_list()
        real = _real_columns(s)
        assert torch.equal(real, d.tokens > 0)  # pad id 0, tokens >= 1
        allowed = ~d.attention_mask[:, 0] & real[:, :, None] & real[:, None, :]
        assert s.layout.useful_pairs() == int(allowed.sum())


def test_row_layouts_by_hand():
    prompt = [11, 12, 13]
    group = [_sample("g", prompt, [21, 22]), _sample("g", prompt, [31, 32, 33]), _sample("g", prompt, [41])]
    (mb,) = build_microbatches(group, micro_batch_size=4, seq_multiple=5, shared_prompt=True, attention="segments")
    assert mb.layout.unit_list() == [Unit(row=0, start=0, prompt=3, responses=(2, 3, 1))]
    # the prompt's triangle 6, responses 2*3 + 3, 3*3 + 6, 1*3 + 1
    assert mb.layout.useful_pairs() == 6 + 9 + 15 + 4
    # one sample per row (sorted by length): each row one causal block of T tokens, T (T + 1) / 2 pairs
    (mb,) = build_microbatches(group, micro_batch_size=4, seq_multiple=5)
    assert mb.layout.unit_list() == [Unit(0, 0, 3, (1,)), Unit(1, 0, 3, (2,)), Unit(2, 0, 3, (3,))]
    assert mb.layout.useful_pairs() == 10 + 15 + 21 and mb.attention_mask is None
    with pytest.raises(ValueError, match=r"one of \('dense', 'segments'\), got 'auto'"):
        build_microbatches(group, micro_batch_size=4, shared_prompt=True, attention="auto")


def test_packing_refuses_a_sample_longer_than_the_budget():
    with pytest.raises(ValueError, match=r"max_tokens_per_microbatch=10 is smaller than a sample of 12 tokens"):
        build_microbatches([_sample("g", [1] * 8, [2] * 4)], 4, max_tokens=10)


def test_prompts_that_differ_do_not_share_a_row():
    a, b = _sample("g", [1, 2], [5]), _sample("g", [1, 3], [6])  # same group id, different prompt tokens
    (mb,) = build_microbatches([a, b], micro_batch_size=2, seq_multiple=1, shared_prompt=True)
    assert mb.tokens.shape == (2, 3) and mb.rows[:, 0].tolist() == [0, 1]


def test_nothing_trainable_gives_one_masked_row_with_a_causal_mask():
    (mb,) = build_microbatches([_sample("g", [1, 2], [3], advantage=None)], 4, seq_multiple=8, shared_prompt=True)
    assert mb.loss_mask.sum() == 0 and mb.tokens.shape == (1, 8)
    assert torch.equal(~mb.attention_mask[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())


def test_allowed_attention_never_crosses_responses():
    seg = torch.tensor([0, 0, 1, 1, 2, 2, -1])
    a = allowed_attention(seg)
    assert not a[4:6, 2:4].any() and not a[2:4, 4:6].any() and a[2:6, :2].all() and not a[:6, 6].any()


def test_shared_prompt_with_context_parallelism_is_a_config_error():
    from megatron_pz.config import RunConfig, TrainConfig
    from megatron_pz.errors import ConfigError
    from megatron_pz.parallel import ParallelConfig

    with pytest.raises(ConfigError, match="train.shared_prompt needs parallel.context_parallel_size 1"):
        RunConfig(train=TrainConfig(shared_prompt=True), parallel=ParallelConfig(context_parallel_size=2))
    with pytest.raises(ConfigError, match="train.max_tokens_per_microbatch needs parallel.context_parallel_size 1"):
        RunConfig(train=TrainConfig(max_tokens_per_microbatch=64), parallel=ParallelConfig(context_parallel_size=2))
    # null resolves off under CP, on with the local spec
    assert not RunConfig(parallel=ParallelConfig(context_parallel_size=2)).shared_prompt_on(transformer_engine=False)
    assert RunConfig().shared_prompt_on(transformer_engine=False)
    assert not RunConfig().shared_prompt_on(transformer_engine=True)
