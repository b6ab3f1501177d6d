"""Shared-prompt attention by regions: the prompt block and each response's blocks, never the ``S x S`` scores.

A shared-prompt row (``trainer/shared_prompt.py``) of ``S = P + R_1 + ... + R_N`` tokens attends with
``allowed[q, k] = k <= q and (segment[k] == 0 or segment[k] == segment[q])`` [PZ §4.1: a GRPO group of N
responses per prompt]. Megatron's local ``DotProductAttention`` computes all ``S x S`` scores and masks most of
them. Here, per unit of the row (``model/row_layout.py``):

    prompt queries    [P]     x  prompt keys [P]                         causal            P x P
    response i        [R_i]   x  (prompt keys [P] ++ its own keys [R_i])  own part causal   R_i x (P + R_i)

with one softmax over each query's concatenated scores, so scores and probabilities take ``P^2 + sum R_i (P +
R_i)`` entries (responses of a unit padded to the longest, batched in one matmul) instead of ``S^2``. Each
query's scores are the same products of the same keys as in the dense masked softmax (``exp`` of a masked entry
is 0 there), so the result is the same up to float summation order. Padding columns (after the last unit) get a
zero output: no real query attends to them and the loss reads none of them.

``SegmentAttention`` is a Megatron ``core_attention`` (``model/provider.layer_spec`` swaps it in): it receives
this TP rank's heads ``[S, B, h, d]`` like ``DotProductAttention`` and returns ``[S, B, h * d]``. Given a
``RowLayout``'s table as ``attention_mask`` (``[U, 3 + N]`` int64; ``GPTModel.forward`` hands ``attention_mask``
through ``TransformerBlock``, ``TransformerLayer`` and ``SelfAttention`` to ``core_attention`` unchanged in
Megatron-Core 0.16 and 0.19, through ``tensor_parallel.checkpoint`` under activation recomputation) it computes by
regions; given a ``[B, 1, S, S]`` bool mask or None it is ``DotProductAttention``. The softmax scale, query-key
layer scaling, fp32 softmax and attention dropout are ``DotProductAttention``'s; grouped-query attention shares
each key/value group among its query heads without copying keys (``[g, rep * L, d] @ [g, d, L_k]``).
"""
from __future__ import annotations

from typing import Callable

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_pz.model.row_layout import RowLayout, Unit


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: RowLayout,
                      scale: float, *, coeff: float | None = None, softmax_in_fp32: bool = True,
                      dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``query`` ``[S, B, hq, d]``, ``key`` ``[S, B, g, d]``, ``value`` ``[S, B, g, dv]`` (hq a multiple of g)
    -> ``[S, B, hq * dv]``.

    ``scale`` multiplies the query-key products (in the input dtype, as ``DotProductAttention``'s ``baddbmm``);
    ``coeff`` (query-key layer scaling) multiplies them again before the softmax, which runs in fp32 when
    ``softmax_in_fp32``; ``dropout`` is applied to the probabilities.
    """
    s, b, hq, _ = query.shape
    dv = value.shape[-1]
    units = layout.unit_list()
    if (layout.rows, layout.seq_len) != (b, s):
        raise ValueError(f"segment_attention: a layout of [{layout.rows}, {layout.seq_len}] for query "
                         f"{tuple(query.shape)}")
    ctx = dict(scale=scale, coeff=coeff, fp32=softmax_in_fp32, dropout=dropout, hq=hq, dv=dv)
    rows = []
    for r in range(b):
        pieces, col = [], 0
        for i, u in enumerate(units):
            if u.row != r:
                continue
            if u.start > col:
                pieces.append(query.new_zeros(u.start - col, hq, dv))
            pieces += _unit(query[:, r], key[:, r], value[:, r], u, layout.unit_indices(i, query.device), ctx)
            col = u.start + u.length
        if col < s:
            pieces.append(query.new_zeros(s - col, hq, dv))
        rows.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows, dim=1).reshape(s, b, hq * dv)


def _unit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: Unit, idx: dict, ctx: dict) -> list[torch.Tensor]:
    """One unit of one row: ``q`` ``[S, hq, d]``, ``k``/``v`` ``[S, g, d]`` -> its outputs in column order,
    ``[P, hq, dv]`` and ``[T, hq, dv]`` (T = its response tokens)."""
    g, d = k.shape[1], k.shape[2]
    hq, dv = ctx["hq"], ctx["dv"]
    rep = hq // g
    p0, p = u.start, u.prompt
    kp = k[p0:p0 + p].permute(1, 2, 0)  # [g, d, P]
    vp = v[p0:p0 + p].transpose(0, 1)  # [g, P, dv]
    # Prompt: [P, hq, d] -> [g, rep * P, d] (head j = group j // rep, as DotProductAttention's repeat_interleave)
    qp = q[p0:p0 + p].reshape(p, g, rep, d).permute(1, 2, 0, 3).reshape(g, rep * p, d)
    probs = _softmax(_scores(qp, kp, ctx).view(g, rep, p, p), idx["prompt_mask"], ctx)
    out = [torch.bmm(probs.view(g, rep * p, p), vp).view(g, rep, p, dv).permute(2, 0, 1, 3).reshape(p, hq, dv)]
    if not u.responses:
        return out
    n, rm, t = len(u.responses), max(u.responses), sum(u.responses)
    r0 = p0 + p

    def padded(x: torch.Tensor) -> torch.Tensor:  # [T, ...] -> [N, R_max, ...]
        x = x[r0:r0 + t]
        return x.view(n, rm, *x.shape[1:]) if idx["gather"] is None else x[idx["gather"]]

    qr = padded(q).view(n, rm, g, rep, d).permute(2, 0, 3, 1, 4)  # [g, N, rep, R_max, d]
    kr = padded(k).permute(2, 0, 3, 1).reshape(g * n, d, rm)  # [g * N, d, R_max]
    vr = padded(v).permute(2, 0, 1, 3).reshape(g * n, rm, dv)  # [g * N, R_max, dv]
    to_prompt = _scores(qr.reshape(g, n * rep * rm, d), kp, ctx).view(g, n, rep, rm, p)
    to_own = _scores(qr.reshape(g * n, rep * rm, d), kr, ctx).view(g, n, rep, rm, rm)
    probs = _softmax(torch.cat([to_prompt, to_own], -1), idx["resp_mask"], ctx)  # [g, N, rep, R_max, P + R_max]
    pp, po = probs.split([p, rm], dim=-1)
    ctx_p = torch.bmm(pp.reshape(g, n * rep * rm, p), vp).view(g, n, rep, rm, dv)
    ctx_o = torch.bmm(po.reshape(g * n, rep * rm, rm), vr).view(g, n, rep, rm, dv)
    resp = (ctx_p + ctx_o).permute(1, 3, 0, 2, 4).reshape(n * rm, hq, dv)  # [N * R_max, hq, dv], column order
    out.append(resp if idx["valid"] is None else resp[idx["valid"]])
    return out


def _scores(q: torch.Tensor, k: torch.Tensor, ctx: dict) -> torch.Tensor:
    """``[G, M, d] @ [G, d, L] * scale`` in the input dtype (``DotProductAttention``'s ``baddbmm``)."""
    buf = q.new_empty(q.shape[0], q.shape[1], k.shape[2])
    return torch.baddbmm(buf, q, k, beta=0.0, alpha=ctx["scale"])


def _softmax(scores: torch.Tensor, mask: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Masked softmax over the last dimension (``mask`` broadcast, True = masked; every query keeps a key), in
    fp32 for 16-bit inputs when asked, back in the input dtype; then dropout. ``scores`` is a fresh tensor no
    backward needs (a matmul's or ``cat``'s output), so the mask is written into it in place."""
    dtype = scores.dtype
    if ctx["fp32"] and dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if ctx["coeff"] is not None:
        scores = scores * ctx["coeff"]
    probs = torch.softmax(scores.masked_fill_(mask, float("-inf")), dim=-1).to(dtype)
    return probs if ctx["dropout"] is None else ctx["dropout"](probs)


class SegmentAttention(DotProductAttention):
    """``DotProductAttention`` that computes shared-prompt rows by regions when given a ``RowLayout`` (or its
    table) as its ``attention_mask`` (module docstring); a bool mask or None take ``DotProductAttention``'s path."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if RowLayout.is_table(attention_mask):
            attention_mask = RowLayout.from_table(attention_mask, query.shape[1], query.shape[0])
        if not isinstance(attention_mask, RowLayout):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SegmentAttention: a RowLayout takes no packed_seq_params or attention_bias")
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
            raise ValueError("SegmentAttention: a RowLayout needs the vanilla softmax without a sliding window")
        softmax = self.scale_mask_softmax
        return segment_attention(query, key, value, attention_mask, self.softmax_scale, coeff=softmax.scale,
                                 softmax_in_fp32=softmax.softmax_in_fp32,
                                 dropout=self._dropout if self.attention_dropout.p > 0 else None)

    def _dropout(self, probs: torch.Tensor) -> torch.Tensor:
        if self.config.sequence_parallel:
            return self.attention_dropout(probs)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.attention_dropout(probs)
