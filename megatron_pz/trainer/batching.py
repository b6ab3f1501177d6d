"""Trainable ``Sample``s -> padded micro-batches of tensors for Megatron's forward/backward (pure).

Layout of one sequence of prompt length P and response length R, padded to S:

    tokens      [p0 .. p(P-1) r0 .. r(R-1) pad ...]                 [S]
    labels[t] = tokens[t+1]                                          [S]   (next-token targets)
    loss_mask[t] = 1 for t in [P-1, P+R-2]: the positions whose label is a response token
    rollout_logprobs[P-1+i] = the engine's log-prob of r_i          [S]
    routed_experts[t] = the engine's expert ids of token t (MoE routing replay, optional)   [S, L*K]
                        (rows P+R-1 .. S-1, the last response token and the padding, are -1: unrecorded)

Samples are sorted by length before chunking so that micro-batches waste little padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_pz.types import Sample


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [B, S] int64
    position_ids: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64
    loss_mask: torch.Tensor  # [B, S] float32
    advantages: torch.Tensor  # [B] float32
    rollout_logprobs: torch.Tensor  # [B, S] float32
    routed_experts: torch.Tensor | None = None  # [B, S, L*K] int32, -1 = unrecorded; None = no routing replay

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(*(t.to(device) if t is not None else None
                            for t in (self.tokens, self.position_ids, self.labels, self.loss_mask, self.advantages,
                                      self.rollout_logprobs, self.routed_experts)))


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def build_microbatches(samples: Sequence[Sample], micro_batch_size: int, pad_id: int = 0,
                       seq_multiple: int = 8, same_length: bool = False,
                       routing_width: int | None = None) -> list[MicroBatch]:
    """Pack trainable samples into micro-batches of ``micro_batch_size`` sequences.

    ``seq_multiple``: pad S to a multiple of this (TP sequence parallelism / CP need divisibility).
    ``same_length``: one S for every micro-batch (Megatron's pipeline schedule sends fixed-shape
    activations); otherwise each micro-batch is padded only to its own longest sequence.
    ``routing_width``: L*K for MoE routing replay: every micro-batch carries ``routed_experts`` and every
    trainable sample must have its engine routing (``Sample.routed_experts``, P+R-1 rows of that width).
    With no trainable sample, returns one all-masked micro-batch so every rank still joins the
    gradient reduction (its gradient is zero).
    """
    trainable = sorted((s for s in samples if s.trainable), key=lambda s: s.num_tokens)
    if not trainable:
        s_len = seq_multiple
        z = torch.zeros(1, s_len, dtype=torch.long)
        routed = None if routing_width is None else torch.full((1, s_len, routing_width), -1, dtype=torch.int32)
        return [MicroBatch(z, torch.arange(s_len).unsqueeze(0), z.clone(), torch.zeros(1, s_len),
                           torch.zeros(1), torch.zeros(1, s_len), routed)]
    global_len = _round_up(max(s.num_tokens for s in trainable), seq_multiple)
    out = []
    for i in range(0, len(trainable), micro_batch_size):
        chunk = trainable[i: i + micro_batch_size]
        s_len = global_len if same_length else _round_up(max(s.num_tokens for s in chunk), seq_multiple)
        b = len(chunk)
        tokens = torch.full((b, s_len), pad_id, dtype=torch.long)
        labels = torch.zeros(b, s_len, dtype=torch.long)
        loss_mask = torch.zeros(b, s_len)
        rollout = torch.zeros(b, s_len)
        adv = torch.zeros(b)
        routed = None if routing_width is None else torch.full((b, s_len, routing_width), -1, dtype=torch.int32)
        for j, s in enumerate(chunk):
            ids = list(s.prompt_ids) + list(s.response_ids)
            p, r = len(s.prompt_ids), len(s.response_ids)
            tokens[j, : len(ids)] = torch.tensor(ids)
            labels[j, : len(ids) - 1] = torch.tensor(ids[1:])
            loss_mask[j, p - 1: p - 1 + r] = 1.0
            if s.rollout_logprobs:
                rollout[j, p - 1: p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
            adv[j] = float(s.advantage)
            if routed is not None:
                routed[j, : p + r - 1] = _routing_rows(s, p + r - 1, routing_width)
        pos = torch.arange(s_len).unsqueeze(0).expand(b, s_len).contiguous()
        out.append(MicroBatch(tokens, pos, labels, loss_mask, adv, rollout, routed))
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
