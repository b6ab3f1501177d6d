"""Shared-prompt rows: a GRPO group's prompt computed once per micro-batch, its responses after it (pure).

Every sample of a group carries the same prompt (the paragraph for the generator's masks, the masked paragraph
for the predictor's answers), often several times longer than a response. One row per group (the part of it
in this micro-batch) lays out

    tokens         [ p0 .. p(P-1) | a0 .. a(A-1) | b0 .. b(B-1) | ... | pad ... ]        [S]
    position_ids   [ 0  .. P-1    | P  .. P+A-1  | P  .. P+B-1  | ... | ...     ]        [S]
    segment        [ 0  ..  0     | 1  ..  1     | 2  ..  2     | ... | -1 ...  ]        (host only)

and attends with ``allowed[q, k] = k <= q and (segment[k] == 0 or segment[k] == segment[q])``: the prompt is
causal as usual, each response sees the whole prompt and its own causal past only, never another response, and
padding (segment -1) sees no real token's future. Every response position therefore sees exactly the keys, at
exactly the rotary positions, that it sees in its own unshared row (``batching.build_microbatches``): same
logits, and in backward the prompt's activations collect the gradient of all the group's responses.

The first response token of every sample is predicted by the same logit (the prompt's last position, column
P - 1); its later tokens by its own positions: ``cols[n] = [P-1, c_n, c_n + 1, ...]`` with c_n the first column
of its response (``batching.loss_view``).

Megatron-Core's ``GPTModel`` takes the mask as ``attention_mask`` (``[B, 1, S, S]``, True = masked, the layer
spec built with ``AttnMaskType.arbitrary``: ``model/provider.py``) but derives rotary angles from the sequence
length alone: ``model/rotary_positions.py`` re-indexes them by ``position_ids``.

A micro-batch holds ``micro_batch_size`` samples, as in the unshared layout: samples are ordered by group, and a
group larger than the remaining room continues in the next micro-batch (its prompt then appears once in each).
DAPO-filtered (untrainable) samples are dropped before grouping. Samples share a row only if they have the same
``group_id`` and the same prompt tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_pz.trainer.batching import MicroBatch, _round_up, loss_view
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


def allowed_attention(segment: torch.Tensor) -> torch.Tensor:
    """``[S]`` segment ids (0 prompt, i > 0 response i, -1 padding) -> ``[S, S]`` bool, True = query may attend."""
    s = segment.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])
    return causal & same


def build_shared_microbatches(samples: Sequence[Sample], micro_batch_size: int, pad_id: int = 0,
                              seq_multiple: int = 8, same_length: bool = False) -> list[MicroBatch]:
    """``batching.build_microbatches`` with ``shared_prompt=True`` (see the module docstring).

    ``same_length`` (pipeline parallelism: fixed-shape p2p activations) gives every micro-batch the same S and
    the same number of rows, padding with all-pad rows where a micro-batch has fewer.
    """
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
        return [_microbatch([], pad_id, seq_multiple, 1)]
    global_len = _round_up(max(row_length(g) for mb in pieces for g in mb), seq_multiple)
    global_rows = max(len(mb) for mb in pieces)
    return [_microbatch(mb, pad_id, global_len if same_length else _round_up(max(map(row_length, mb)), seq_multiple),
                        global_rows if same_length else len(mb)) for mb in pieces]


def _microbatch(groups: list[list[Sample]], pad_id: int, s_len: int, n_rows: int) -> MicroBatch:
    tokens = torch.full((n_rows, s_len), pad_id, dtype=torch.long)
    pos = torch.arange(s_len).repeat(n_rows, 1)
    segment = torch.full((n_rows, s_len), -1, dtype=torch.long)
    placed = []
    for row, group in enumerate(groups):
        p = len(group[0].prompt_ids)
        tokens[row, :p] = torch.tensor(group[0].prompt_ids)
        segment[row, :p] = 0
        start = p
        for i, s in enumerate(group, start=1):
            r = len(s.response_ids)
            tokens[row, start: start + r] = torch.tensor(s.response_ids, dtype=torch.long)
            pos[row, start: start + r] = torch.arange(p, p + r)
            segment[row, start: start + r] = i
            placed.append((row, p - 1, start, s))
            start += r
        pos[row, start:] = torch.arange(start, s_len)  # padding: any in-range positions (never read)
    mask = torch.stack([~allowed_attention(seg) for seg in segment]).unsqueeze(1)  # [B, 1, S, S], True = masked
    return MicroBatch(tokens=tokens, position_ids=pos, attention_mask=mask, **loss_view(placed))
