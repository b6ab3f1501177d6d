"""Context parallelism's data layout: which positions of a micro-batch each CP rank holds, and how per-position
results come back together (pure tensor functions).

Megatron's load-balanced split (``get_batch_on_this_cp_rank`` in Megatron-LM's ``utils.py``): the sequence
``[B, S]`` is cut into ``2 x CP`` equal chunks and CP rank ``r`` keeps chunks ``r`` and ``2 x CP - 1 - r``, so
under causal attention every rank has as many keys to attend to (an early chunk and a late one):

    S = 16, CP = 2: chunks c0 c1 c2 c3 of 4 positions; rank 0 holds [c0, c3], rank 1 holds [c1, c2]

Every position keeps its global rotary position (``position_ids`` are split the same way), and attention across
chunks is Transformer Engine's CP attention (a ring over the CP group). The loss view of ``trainer/batching.py``
indexes the logits by global (row, column): ``local_columns`` says which of a sample's response tokens a rank
holds and where; the rank computes the loss on those only, and the token counts and gradients add up over the CP
group (Megatron's DDP reduces gradients over DP x CP). ``gather_positions`` puts per-position results (log-probs,
logits) of every rank back in sequence order.

The train step does not use this yet: a run with ``parallel.context_parallel_size`` > 1 is refused
(``trainer/preflight.check_parallel``) until it does and a CUDA test shows it equal to CP 1.
"""
from __future__ import annotations

import torch


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of the ``2 x cp_size`` chunks CP rank ``cp_rank`` holds, in sequence order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"CP rank {cp_rank} outside a CP group of {cp_size}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_sequence(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's positions of ``x`` along ``dim`` (``[B, S, ...]`` -> ``[B, S / CP, ...]``), Megatron's layout.
    ``S`` must be a multiple of ``2 x cp_size`` (``batching.seq_multiple`` pads to it)."""
    if cp_size == 1:
        return x
    seq = x.shape[dim]
    if seq % (2 * cp_size):
        raise ValueError(f"sequence length {seq} is not a multiple of 2 x CP = {2 * cp_size}")
    chunks = x.chunk(2 * cp_size, dim=dim)
    first, second = chunk_ids(cp_size, cp_rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def local_positions(seq: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The global positions this rank holds, in its local order: ``[S / CP]``."""
    return split_sequence(torch.arange(seq).unsqueeze(0), cp_size, cp_rank)[0]


def local_columns(cols: torch.Tensor, seq: int, cp_size: int, cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global columns ``cols`` (``[N, R]``, the loss view) -> (local columns, held) on this rank: ``held[n, k]`` is
    True where this rank holds column ``cols[n, k]``, and the local column is its index in the rank's
    ``[B, S / CP]`` slice (0 where not held: mask those out)."""
    to_local = torch.full((seq,), -1, dtype=torch.long)
    to_local[local_positions(seq, cp_size, cp_rank)] = torch.arange(seq // cp_size)
    local = to_local[cols.clamp(0, seq - 1)]
    held = local >= 0
    return local.clamp(min=0), held


def gather_positions(parts: list[torch.Tensor], cp_size: int, dim: int = 1) -> torch.Tensor:
    """The inverse of ``split_sequence``: ``parts[r]`` is CP rank r's slice (e.g. from an all-gather over the CP
    group) -> the whole sequence in order along ``dim``."""
    if len(parts) != cp_size:
        raise ValueError(f"{len(parts)} parts for a CP group of {cp_size}")
    if cp_size == 1:
        return parts[0]
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        first, second = chunk_ids(cp_size, rank)
        chunks[first], chunks[second] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)
