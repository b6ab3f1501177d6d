"""Trainable ``Sample``s -> micro-batches of tensors for Megatron's forward/backward (pure).

A micro-batch has two views. The model view is what the forward pass reads, ``B`` rows of ``S`` tokens:

    tokens        [B, S]      the rows (padded)
    position_ids  [B, S]      rotary positions
    attention_mask            None = causal (one sample per row, this module), or ``[B, 1, S, S]`` bool,
                              True = masked (shared-prompt rows, ``trainer/shared_prompt.py``)

The loss view is one entry per sample and response token, ``N`` samples by ``R`` = the longest response:

    labels[n, k]            = response token k of sample n                       [N, R]
    rows[n, k], cols[n, k]  = where in [B, S] the logit predicting it sits       [N, R]
    loss_mask[n, k]         = 1 for k < the response length                      [N, R]
    rollout_logprobs[n, k]  = the engine's log-prob of that token                [N, R]
    advantages[n]                                                                [N]

The loss gathers ``logits[rows, cols]`` (``[N, R, V]``) and never reads another position. Here (one sample per
row, prompt length P, response length R_n, padded to S):

    tokens  [p0 .. p(P-1) r0 .. r(R_n - 1) pad ...]     cols[n, k] = P - 1 + k     (the logit at t predicts t + 1)

With MoE routing replay (``routing_width`` = layers x top-k) the model view also carries the engine's routing:

    routed_experts[b, t] = the expert ids token t of row b was routed to by the engine   [B, S, L*K] int32
                           (-1 for the last response token and padding: never fed to the engine)

Samples are sorted by length before chunking so that micro-batches waste little padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from megatron_pz.types import Sample


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [B, S] int64
    position_ids: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [N, R] int64: the response tokens
    loss_mask: torch.Tensor  # [N, R] float32
    advantages: torch.Tensor  # [N] float32
    rollout_logprobs: torch.Tensor  # [N, R] float32
    rows: torch.Tensor  # [N, R] int64: row in [B, S] of the logit predicting labels[n, k]
    cols: torch.Tensor  # [N, R] int64: its column
    attention_mask: torch.Tensor | None = None  # None = causal; [B, 1, S, S] bool, True = masked
    routed_experts: torch.Tensor | None = None  # [B, S, L*K] int32, -1 = unrecorded; None = no routing replay

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def loss_view(placed: Sequence[tuple[int, int, int, Sample]]) -> dict[str, torch.Tensor]:
    """The loss view (module docstring) of samples placed in rows: ``(row, c0, c1, sample)`` per sample.

    ``c0``: the column whose logit predicts the first response token (the prompt's last position); ``c1``: the
    column of the first response token, so response token k >= 1 is predicted at ``c1 + k - 1``. Entries past a
    response's end repeat its last column (``loss_mask`` 0: read, never counted). No samples: one all-masked
    entry at (0, 0).
    """
    n = max(len(placed), 1)
    r = max([1] + [len(s.response_ids) for *_, s in placed])
    rows = torch.zeros(n, r, dtype=torch.long)
    cols = torch.zeros(n, r, dtype=torch.long)
    labels = torch.zeros(n, r, dtype=torch.long)
    loss_mask = torch.zeros(n, r)
    rollout = torch.zeros(n, r)
    adv = torch.zeros(n)
    k = torch.arange(r)
    for i, (row, c0, c1, s) in enumerate(placed):
        length = len(s.response_ids)
        rows[i] = row
        col = torch.where(k == 0, c0, c1 + k - 1)
        cols[i] = col.clamp(max=int(col[max(length - 1, 0)]))
        if length:
            labels[i, :length] = torch.tensor(s.response_ids)
            loss_mask[i, :length] = 1.0
        if s.rollout_logprobs:
            rollout[i, :length] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        adv[i] = float(s.advantage)
    return {"rows": rows, "cols": cols, "labels": labels, "loss_mask": loss_mask, "rollout_logprobs": rollout,
            "advantages": adv}


def empty_microbatch(seq_len: int) -> MicroBatch:
    """One all-masked row of ``seq_len`` pad tokens: a rank without trainable samples still joins the gradient
    reduction (its gradient is zero)."""
    z = torch.zeros(1, seq_len, dtype=torch.long)
    one = torch.zeros(1, 1, dtype=torch.long)
    return MicroBatch(tokens=z, position_ids=torch.arange(seq_len).unsqueeze(0), labels=one.clone(),
                      loss_mask=torch.zeros(1, 1), advantages=torch.zeros(1), rollout_logprobs=torch.zeros(1, 1),
                      rows=one.clone(), cols=one.clone())


def build_microbatches(samples: Sequence[Sample], micro_batch_size: int, pad_id: int = 0,
                       seq_multiple: int = 8, same_length: bool = False,
                       shared_prompt: bool = False, max_tokens: int | None = None,
                       routing_width: int | None = None) -> list[MicroBatch]:
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
    With no trainable sample, returns one all-masked micro-batch (``empty_microbatch``).
    """
    if routing_width is not None and (shared_prompt or max_tokens is not None):
        raise ValueError("routing replay lays out one sample per row: not with shared_prompt or max_tokens")
    if max_tokens is not None:
        from megatron_pz.trainer.shared_prompt import build_packed_microbatches

        return build_packed_microbatches(samples, max_tokens, pad_id, seq_multiple, same_length, shared_prompt)
    if shared_prompt:
        from megatron_pz.trainer.shared_prompt import build_shared_microbatches

        return build_shared_microbatches(samples, micro_batch_size, pad_id, seq_multiple, same_length)
    trainable = sorted((s for s in samples if s.trainable), key=lambda s: s.num_tokens)
    if not trainable:
        return [empty_microbatch(seq_multiple)]
    global_len = _round_up(max(s.num_tokens for s in trainable), seq_multiple)
    out = []
    for i in range(0, len(trainable), micro_batch_size):
        chunk = trainable[i: i + micro_batch_size]
        s_len = global_len if same_length else _round_up(max(s.num_tokens for s in chunk), seq_multiple)
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
        out.append(MicroBatch(tokens=tokens, position_ids=pos, routed_experts=routed, **view))
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
