"""The segment core attention (model/segment_attention.py) against a dense masked softmax, alone (no model).

Outputs and the gradients of query, key and value on random tensors (fp64 and fp32), for layouts with ragged and
equal responses, several units in a row (packed rows), an all-padding row, grouped-query heads, query-key layer
scaling, and a case small enough to check by hand. The model-level exactness (loss, log-probs, every gradient
against the unshared layout at TP1, TP2, PP2) is tests/distributed/test_shared_prompt_layouts.py.
"""
import math

import pytest
import torch

from megatron_pz.model import segment_attention as segment
from megatron_pz.model.row_layout import RowLayout, Unit


def _allowed(layout: RowLayout) -> torch.Tensor:
    """``[B, S, S]`` bool from the units alone: k <= q, same unit, and k in the prompt or in q's own response."""
    b, s = layout.rows, layout.seq_len
    seg = torch.full((b, s), -1)
    unit = torch.zeros(b, s, dtype=torch.long)
    for ui, u in enumerate(layout.unit_list(), start=1):
        seg[u.row, u.start:u.start + u.prompt] = 0
        unit[u.row, u.start:u.start + u.length] = ui
        c = u.start + u.prompt
        for i, r in enumerate(u.responses, start=1):
            seg[u.row, c:c + r] = i
            c += r
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    return causal & same & (unit[:, None, :] == unit[:, :, None]) & (unit[:, :, None] > 0)


def _dense(q, k, v, allowed, scale, coeff=None):
    """DotProductAttention's computation: keys repeated per query head, S x S scores, masked softmax."""
    s, b, hq, d = q.shape
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    if coeff is not None:
        scores = scores * coeff
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], -10000.0), dim=-1)
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(s, b, hq * v.shape[-1])


def _real(layout: RowLayout) -> torch.Tensor:
    """``[S, B]`` bool: columns that belong to some unit (padding columns are never read)."""
    real = torch.zeros(layout.seq_len, layout.rows, dtype=torch.bool)
    for u in layout.unit_list():
        real[u.start:u.start + u.length, u.row] = True
    return real


LAYOUTS = {
    "ragged": (2, 24, [Unit(0, 0, 7, (5, 1, 9)), Unit(1, 0, 4, (3, 3))]),
    "equal": (1, 20, [Unit(0, 0, 8, (4, 4, 4))]),
    "packed": (1, 32, [Unit(0, 0, 5, (2, 6)), Unit(0, 13, 3, (4,)), Unit(0, 20, 6, (1, 2, 3))]),
    "pad-row": (3, 16, [Unit(0, 0, 6, (2, 4, 3)), Unit(2, 0, 9, (7,))]),  # row 1: padding only (PP)
    "no-prompt": (1, 8, [Unit(0, 0, 0, (3, 5))]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_matches_dense_masked_softmax(name, heads, groups, dtype):
    rows, s, units = LAYOUTS[name]
    layout = RowLayout.of(rows, s, units)
    g = torch.Generator().manual_seed(hash((name, heads, groups)) % 2**31)
    d, dv = 8, 8
    q, k, v = (torch.randn(s, rows, h, d, generator=g, dtype=dtype, requires_grad=True)
               for h in (heads, groups, groups))
    scale, coeff = 1 / math.sqrt(d) / 3, 3.0  # query-key layer scaling: scale / coeff before, x coeff after
    out = segment.segment_attention(q, k, v, layout, scale, coeff=coeff)
    ref = _dense(q, k, v, _allowed(layout), scale, coeff)
    real = _real(layout)
    assert out.shape == (s, rows, heads * dv)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))  # padding: zero output
    w = torch.randn(out.shape, generator=g, dtype=dtype) * real[..., None]
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip((out[real], *grads), (ref[real], *ref_grads)):
        assert float((a - b).detach().abs().max() / b.detach().abs().max()) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_softmax_in_fp32(dtype):
    """16-bit query, key and value: scores in the input dtype, softmax in fp32, probabilities back in the input
    dtype (DotProductAttention's attention_softmax_in_fp32): close to the fp64 result at 16-bit precision."""
    rows, s, units = LAYOUTS["ragged"]
    layout = RowLayout.of(rows, s, units)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(s, rows, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    out = segment.segment_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout, 8 ** -0.5)
    ref = segment.segment_attention(q, k, v, layout, 8 ** -0.5)
    assert out.dtype == dtype
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 2e-2


def test_by_hand():
    """Prompt of 2, responses of 1 and 2, one head, zero queries and keys: every allowed key weighs the same, so
    each output is the mean of the values it may see. Columns: p0 p1 | a0 | b0 b1 | pad."""
    layout = RowLayout.of(1, 6, [Unit(0, 0, 2, (1, 2))])
    q = torch.zeros(6, 1, 1, 1)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 100.0]).view(6, 1, 1, 1)
    out = segment.segment_attention(q, q.clone(), v, layout, 1.0).flatten().tolist()
    # p0: {1}; p1: {1, 2}; a0: {1, 2, 3}; b0: {1, 2, 4} (not a0); b1: {1, 2, 4, 5}; pad: 0
    assert out == pytest.approx([1.0, 1.5, 2.0, 7 / 3, 3.0, 0.0])


def test_counts_and_validation():
    u = Unit(0, 0, 4, (2, 3))
    # prompt 4*5/2; responses 2*4 + 3 and 3*4 + 6; computed: 4^2 + 2 * 3 * (4 + 3)
    assert (u.useful_pairs(), u.segment_pairs()) == (10 + 11 + 18, 16 + 42)
    layout = RowLayout.of(1, 9, [u])
    assert layout.useful_pairs() == 39
    # the model gets the table ([U, 3 + N] int64): row, first column, prompt, responses; read back once per content
    assert layout.table.tolist() == [[0, 0, 4, 2, 3]] and RowLayout.is_table(layout.table)
    back = RowLayout.from_table(layout.table, 1, 9)
    assert back.unit_list() == [u] and RowLayout.from_table(layout.table.clone(), 1, 9) is back
    assert not RowLayout.is_table(torch.zeros(1, 1, 9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="overlaps"):
        RowLayout.of(1, 12, [u, Unit(0, 8, 1, (1,))]).unit_list()
    with pytest.raises(ValueError, match="leaves"):
        RowLayout.of(1, 8, [u])
