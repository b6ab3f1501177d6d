"""Trainable ``Sample``s -> micro-batches of tensors for Megatron's forward/backward (pure).

A micro-batch has two views. The model view is what the forward pass reads, ``B`` rows of ``S`` tokens:

    tokens        [B, S]      the rows (padded)
    position_ids  [B, S]      rotary positions
    attention_mask            None = causal (one sample per row, this module), or ``[B, 1, S, S]`` bool,
                              True = masked (shared-prompt rows, ``trainer/shared_prompt.py``), or their
                              ``RowLayout`` (segment attention, ``model/segment_attention.py``)
    layout                    the rows' units (``model/row_layout.py``), every layout: for FLOP counts

The loss view is one entry per sample and response token, ``N`` samples by ``R`` = the longest response:

    labels[n, k]            = response token k of sample n                       [N, R]
    rows[n, k], cols[n, k]  = where in [B, S] the logit predicting it sits       [N, R]
    loss_mask[n, k]         = 1 for k < the response length                      [N, R]
    rollout_logprobs[n, k]  = the engine's log-prob of that token                [N, R]
    advantages[n]                                                                [N]

The loss gathers ``logits[rows, cols]`` (``[N, R, V]``) and never reads another position. Here (one sample per
row, prompt length P, response length R_n, padded to S):

    tokens  [p0 .. p(P-1) r0 .. r(R_n - 1) pad ...]     cols[n, k] = P - 1 + k     (the logit at t predicts t + 1)

``MicroBatch``, the loss view (``loss_view``) and ``empty_microbatch`` live in ``trainer/microbatch.py``, which
both layouts import (this module and ``trainer/shared_prompt.py``); they are importable from here too.

With MoE routing replay (``routing_width`` = layers x top-k) the model view also carries the engine's routing:

    routed_experts[b, t] = the expert ids token t of row b was routed to by the engine   [B, S, L*K] int32
                           (-1 for the last response token and padding: never fed to the engine)

Samples are sorted by length before chunking so that micro-batches waste little padding.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_pz.model.row_layout import RowLayout, Unit
from megatron_pz.trainer.microbatch import MicroBatch, empty_microbatch, loss_view, round_up
from megatron_pz.types import Sample

__all__ = ["MicroBatch", "build_microbatches", "empty_microbatch", "loss_view"]


def build_microbatches(samples: Sequence[Sample], micro_batch_size: int, pad_id: int = 0,
                       seq_multiple: int = 8, same_length: bool = False,
                       shared_prompt: bool = False, max_tokens: int | None = None,
                       routing_width: int | None = None, attention: str = "dense") -> list[MicroBatch]:
    """Pack trainable samples into micro-batches of ``micro_batch_size`` samples.

    ``seq_multiple``: pad S to a multiple of this (TP sequence parallelism / CP need divisibility).
    ``same_length``: one ``[B, S]`` for every micro-batch (Megatron's pipeline schedule sends fixed-shape
    activations: a last micro-batch with fewer samples gets all-pad rows); otherwise each micro-batch is padded
    only to its own longest sequence.
    ``shared_prompt``: samples of one micro-batch that share a prompt share one row
    (``trainer/shared_prompt.py``); otherwise one sample per row.
    ``max_tokens`` (``train.max_tokens_per_microbatch``): token-budget micro-batches instead, one packed row of
    samples (or shared-prompt groups) each, ``micro_batch_size`` unused (``shared_prompt.build_packed_microbatches``).
    ``routing_width``: L*K for MoE routing replay (one sample per row only): every micro-batch carries
    ``routed_experts`` and every trainable sample must have its engine routing (``Sample.routed_experts``, P+R-1
    rows of that width).
    ``attention`` (``train.shared_prompt_attention``): how shared-prompt and packed rows attend, a dense mask or
    the row layout (``shared_prompt.build_shared_microbatches``).
    With no trainable sample, returns one all-masked micro-batch (``empty_microbatch``).
    """
    if routing_width is not None and (shared_prompt or max_tokens is not None):
        raise ValueError("routing replay lays out one sample per row: not with shared_prompt or max_tokens")
    if max_tokens is not None:
        from megatron_pz.trainer.shared_prompt import build_packed_microbatches

        return build_packed_microbatches(samples, max_tokens, pad_id, seq_multiple, same_length, shared_prompt,
                                         attention)
    if shared_prompt:
        from megatron_pz.trainer.shared_prompt import build_shared_microbatches

        return build_shared_microbatches(samples, micro_batch_size, pad_id, seq_multiple, same_length, attention)
    trainable = sorted((s for s in samples if s.trainable), key=lambda s: s.num_tokens)
    if not trainable:
        return [empty_microbatch(seq_multiple)]
    global_len = round_up(max(s.num_tokens for s in trainable), seq_multiple)
    out = []
    for i in range(0, len(trainable), micro_batch_size):
        chunk = trainable[i: i + micro_batch_size]
        s_len = global_len if same_length else round_up(max(s.num_tokens for s in chunk), seq_multiple)
        b = micro_batch_size if same_length else len(chunk)
        tokens = torch.full((b, s_len), pad_id, dtype=torch.long)
        routed = None if routing_width is None else torch.full((b, s_len, routing_width), -1, dtype=torch.int32)
        for j, s in enumerate(chunk):
            ids = list(s.prompt_ids) + list(s.response_ids)
            tokens[j, : len(ids)] = torch.tensor(ids)
            if routed is not None:
                routed[j, : len(ids) - 1] = _routing_rows(s, len(ids) - 1, routing_width)
        view = loss_view([(j, len(s.prompt_ids) - 1, len(s.prompt_ids), s) for j, s in enumerate(chunk)])
        pos = torch.arange(s_len).unsqueeze(0).expand(b, s_len).contiguous()
        layout = RowLayout.of(b, s_len, [Unit(j, 0, len(s.prompt_ids), (len(s.response_ids),))
                                         for j, s in enumerate(chunk)])
        out.append(MicroBatch(tokens=tokens, position_ids=pos, routed_experts=routed, layout=layout, **view))
    return out


def _routing_rows(s: Sample, rows: int, width: int) -> torch.Tensor:
    """The engine's routing of a sample as ``[rows, width]`` int32; ValueError naming the sample when it is
    missing or the wrong shape (routing replay needs every trained token's routing)."""
    if s.routed_experts is None:
        raise ValueError(f"sample {s.group_id} ({s.task.value}) has no routed_experts: routing replay needs the "
                         f"rollout engine's routing (SGLang --enable-return-routed-experts)")
    t = torch.as_tensor(s.routed_experts).to(torch.int32)
    if tuple(t.shape) != (rows, width):
        raise ValueError(f"sample {s.group_id} ({s.task.value}): routed_experts has shape {tuple(t.shape)}, "
                         f"expected ({rows}, {width}) = (prompt + response - 1 tokens, layers x top-k)")
    return t


def seq_multiple(tensor_parallel: int, sequence_parallel: bool, context_parallel: int) -> int:
    """What every row length is padded to a multiple of: 8 (tensor-core friendly), times TP with sequence
    parallelism (the sequence is split over TP ranks), times 2 x CP (Megatron's load-balanced CP chunks)."""
    return 8 * (tensor_parallel if sequence_parallel else 1) * 2 * context_parallel
