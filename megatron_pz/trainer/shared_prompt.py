"""Shared-prompt rows: a GRPO group's prompt computed once per micro-batch, its responses after it (pure).

Every sample of a group carries the same prompt (the paragraph for the generator's masks, the masked paragraph
for the predictor's answers), often several times longer than a response. One row per group (the part of it
in this micro-batch) lays out

    tokens         [ p0 .. p(P-1) | a0 .. a(A-1) | b0 .. b(B-1) | ... | pad ... ]        [S]
    position_ids   [ 0  .. P-1    | P  .. P+A-1  | P  .. P+B-1  | ... | ...     ]        [S]
    segment        [ 0  ..  0     | 1  ..  1     | 2  ..  2     | ... | -1 ...  ]        (host only)

and attends with ``allowed[q, k] = k <= q and (segment[k] == 0 or segment[k] == segment[q])``: the prompt is
causal as usual, each response sees the whole prompt and its own causal past only, never another response, and
padding (segment -1) sees only padding. Every response position therefore sees exactly the keys, at
exactly the rotary positions, that it sees in its own unshared row (``batching.build_microbatches``): same
logits, and in backward the prompt's activations collect the gradient of all the group's responses.

The first response token of every sample is predicted by the same logit (the prompt's last position, column
P - 1); its later tokens by its own positions: ``cols[n] = [P-1, c_n, c_n + 1, ...]`` with c_n the first column
of its response (``microbatch.loss_view``).

Megatron-Core's ``GPTModel`` takes the mask as ``attention_mask`` (``[B, 1, S, S]``, True = masked, the layer
spec built with ``AttnMaskType.arbitrary``: ``model/provider.py``) but derives rotary angles from the sequence
length alone: ``model/rotary_positions.py`` re-indexes them by ``position_ids``. With ``attention="segments"``
(``train.shared_prompt_attention``) the micro-batch's ``RowLayout`` (``model/row_layout.py``: per unit its row,
first column, prompt length and response lengths) goes in as ``attention_mask`` instead, and the segment core
attention (``model/segment_attention.py``) computes the prompt block and each response's blocks only: memory and
work P^2 + sum R_i (P + R_i) per row instead of S^2. Every micro-batch carries its ``RowLayout`` (``layout``)
either way, for the FLOP count.

A micro-batch holds ``micro_batch_size`` samples, as in the unshared layout: samples are ordered by group, and a
group larger than the remaining room continues in the next micro-batch (its prompt then appears once in each).
DAPO-filtered (untrainable) samples are dropped before grouping. Samples share a row only if they have the same
``group_id`` and the same prompt tokens.

Packed rows (``train.max_tokens_per_microbatch``, ``build_packed_microbatches``) put several units (a sample, or
a group behind its prompt) side by side in one row; a unit id per token keeps each unit's attention inside
itself and positions restart at 0 per unit. Measured slower than padding with the dense mask (the S x S attention
of the whole row: docs/performance.md change 6), faster with the segment attention, but not faster than
shared-prompt rows alone (change 8), so off by default.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_pz.model.row_layout import RowLayout, Unit
from megatron_pz.trainer.microbatch import MicroBatch, loss_view, round_up
from megatron_pz.types import Sample


def group_samples(samples: Sequence[Sample]) -> list[list[Sample]]:
    """Trainable samples grouped by (group_id, prompt tokens), in order of first appearance within the group,
    groups ordered by their shared-row length (short first, like the unshared layout's length sort)."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        if s.trainable:
            groups.setdefault((s.group_id, tuple(s.prompt_ids)), []).append(s)
    return sorted(groups.values(), key=row_length)


def row_length(group: Sequence[Sample]) -> int:
    """Tokens of the shared row of ``group``: the prompt once, every response."""
    return len(group[0].prompt_ids) + sum(len(s.response_ids) for s in group)


def allowed_attention(segment: torch.Tensor, unit: torch.Tensor | None = None) -> torch.Tensor:
    """``[S]`` ids -> ``[S, S]`` bool, True = the query (row) may attend to the key (column).

    ``segment``: 0 the prompt, i > 0 response i, -1 padding. ``unit`` (packed rows): which prompt-and-responses
    block of the row a token belongs to (0 padding); a query sees keys of its own unit only. None = one unit.
    """
    s = segment.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])
    if unit is not None:
        same = same & (unit[None, :] == unit[:, None])
    return causal & same


ROW_ATTENTION = ("dense", "segments")


def _check_attention(attention: str) -> None:
    if attention not in ROW_ATTENTION:
        raise ValueError(f"shared-prompt rows attend through one of {ROW_ATTENTION}, got {attention!r}")


def build_shared_microbatches(samples: Sequence[Sample], micro_batch_size: int, pad_id: int = 0,
                              seq_multiple: int = 8, same_length: bool = False,
                              attention: str = "dense") -> list[MicroBatch]:
    """``batching.build_microbatches`` with ``shared_prompt=True`` (see the module docstring).

    ``same_length`` (pipeline parallelism: fixed-shape p2p activations) gives every micro-batch the same S and
    the same number of rows, padding with all-pad rows where a micro-batch has fewer. ``attention``: how the
    model attends (``train.shared_prompt_attention`` resolved): ``dense``, a ``[B, 1, S, S]`` mask (Megatron's
    S x S scores), or ``segments``, the micro-batch's ``RowLayout`` (``model/segment_attention.py``: the prompt
    and response blocks only).
    """
    _check_attention(attention)
    pieces: list[list[list[Sample]]] = [[]]  # micro-batches of row groups
    room = micro_batch_size
    for group in group_samples(samples):
        while group:
            if room == 0:
                pieces.append([])
                room = micro_batch_size
            take, group = group[:room], group[room:]
            pieces[-1].append(take)
            room -= len(take)
    if not pieces[0]:  # nothing trainable: one all-masked row (causal mask), see batching.empty_microbatch
        return [_microbatch([], pad_id, seq_multiple, 1, attention)]
    rows = [[[g] for g in mb] for mb in pieces]  # one unit (group) per row
    global_len = round_up(max(row_length(g) for mb in pieces for g in mb), seq_multiple)
    global_rows = max(len(mb) for mb in pieces)
    return [_microbatch(mb, pad_id, global_len if same_length else round_up(max(map(row_length, p)), seq_multiple),
                        global_rows if same_length else len(mb), attention) for mb, p in zip(rows, pieces)]


def build_packed_microbatches(samples: Sequence[Sample], max_tokens: int, pad_id: int = 0, seq_multiple: int = 8,
                              same_length: bool = False, shared_prompt: bool = False,
                              attention: str = "dense") -> list[MicroBatch]:
    """Token-budget micro-batches (``train.max_tokens_per_microbatch``): one packed row each, at most
    ``max_tokens`` real tokens (the row is padded to a multiple of ``seq_multiple``).

    Units are single samples, or with ``shared_prompt`` a group's samples behind their prompt (split into pieces
    that fit). They are packed first-fit by decreasing length, so a micro-batch's only padding is its row's tail;
    each unit attends only to itself (``allowed_attention`` with unit ids) and its positions restart at 0, so every
    token sees what it sees in its own row. ``same_length``: every row padded to the longest one. ``attention``
    as in ``build_shared_microbatches``.
    """
    _check_attention(attention)
    units = group_samples(samples) if shared_prompt else sorted(([s] for s in samples if s.trainable), key=row_length)
    pieces: list[list[Sample]] = []
    for unit in units:
        cur: list[Sample] = []
        for s in unit:
            if s.num_tokens > max_tokens:
                raise ValueError(f"train.max_tokens_per_microbatch={max_tokens} is smaller than a sample of "
                                 f"{s.num_tokens} tokens (group {s.group_id!r}: prompt {len(s.prompt_ids)} + "
                                 f"response {len(s.response_ids)})")
            if cur and row_length(cur + [s]) > max_tokens:
                pieces.append(cur)
                cur = []
            cur.append(s)
        if cur:
            pieces.append(cur)
    if not pieces:
        return [_microbatch([], pad_id, seq_multiple, 1, attention)]
    bins: list[list[list[Sample]]] = []
    used: list[int] = []
    for piece in sorted(pieces, key=row_length, reverse=True):  # first fit, decreasing
        n = row_length(piece)
        for i, u in enumerate(used):
            if u + n <= max_tokens:
                bins[i].append(piece)
                used[i] += n
                break
        else:
            bins.append([piece])
            used.append(n)
    global_len = round_up(max(used), seq_multiple)
    return [_microbatch([b], pad_id, global_len if same_length else round_up(u, seq_multiple), 1, attention)
            for b, u in zip(bins, used)]


def _microbatch(rows: list[list[list[Sample]]], pad_id: int, s_len: int, n_rows: int, attention: str) -> MicroBatch:
    """Rows of units (a unit: samples behind one shared prompt) -> a micro-batch of ``n_rows`` x ``s_len``,
    attending through a dense mask or the ``RowLayout``."""
    tokens = torch.full((n_rows, s_len), pad_id, dtype=torch.long)
    pos = torch.arange(s_len).repeat(n_rows, 1)
    segment = torch.full((n_rows, s_len), -1, dtype=torch.long)
    unit_id = torch.zeros(n_rows, s_len, dtype=torch.long)
    placed, layout_units = [], []
    for row, units in enumerate(rows):
        start = 0
        for u, group in enumerate(units, start=1):
            p = len(group[0].prompt_ids)
            layout_units.append(Unit(row, start, p, tuple(len(s.response_ids) for s in group)))
            tokens[row, start: start + p] = torch.tensor(group[0].prompt_ids)
            pos[row, start: start + p] = torch.arange(p)
            segment[row, start: start + p] = 0
            unit_id[row, start: start + p] = u
            prompt_end = start + p
            start = prompt_end
            for i, s in enumerate(group, start=1):
                r = len(s.response_ids)
                tokens[row, start: start + r] = torch.tensor(s.response_ids, dtype=torch.long)
                pos[row, start: start + r] = torch.arange(p, p + r)
                segment[row, start: start + r] = i
                unit_id[row, start: start + r] = u
                placed.append((row, prompt_end - 1, start, s))
                start += r
        pos[row, start:] = torch.arange(start, s_len)  # padding: any in-range positions (never read)
    layout = RowLayout.of(n_rows, s_len, layout_units)
    if attention == "segments":
        mask = layout
    else:
        mask = torch.stack([~allowed_attention(seg, unit) for seg, unit in zip(segment, unit_id)]).unsqueeze(1)
    return MicroBatch(tokens=tokens, position_ids=pos, attention_mask=mask, layout=layout, **loss_view(placed))
