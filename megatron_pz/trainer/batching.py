"""Trainable ``Sample``s -> padded micro-batches of tensors for Megatron's forward/backward (pure).

Layout of one sequence of prompt length P and response length R, padded to S:

    tokens      [p0 .. p(P-1) r0 .. r(R-1) pad ...]                 [S]
    labels[t] = tokens[t+1]                                          [S]   (next-token targets)
    loss_mask[t] = 1 for t in [P-1, P+R-2]: the positions whose label is a response token
    rollout_logprobs[P-1+i] = the engine's log-prob of r_i          [S]

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

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(*(t.to(device) for t in (self.tokens, self.position_ids, self.labels, self.loss_mask,
                                                   self.advantages, self.rollout_logprobs)))


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def build_microbatches(samples: Sequence[Sample], micro_batch_size: int, pad_id: int = 0,
                       seq_multiple: int = 8, same_length: bool = False) -> list[MicroBatch]:
    """Pack trainable samples into micro-batches of ``micro_batch_size`` sequences.

    ``seq_multiple``: pad S to a multiple of this (TP sequence parallelism / CP need divisibility).
    ``same_length``: one S for every micro-batch (Megatron's pipeline schedule sends fixed-shape
    activations); otherwise each micro-batch is padded only to its own longest sequence.
    With no trainable sample, returns one all-masked micro-batch so every rank still joins the
    gradient reduction (its gradient is zero).
    """
    trainable = sorted((s for s in samples if s.trainable), key=lambda s: s.num_tokens)
    if not trainable:
        s_len = seq_multiple
        z = torch.zeros(1, s_len, dtype=torch.long)
        return [MicroBatch(z, torch.arange(s_len).unsqueeze(0), z.clone(), torch.zeros(1, s_len),
                           torch.zeros(1), torch.zeros(1, s_len))]
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
        for j, s in enumerate(chunk):
            ids = list(s.prompt_ids) + list(s.response_ids)
            p, r = len(s.prompt_ids), len(s.response_ids)
            tokens[j, : len(ids)] = torch.tensor(ids)
            labels[j, : len(ids) - 1] = torch.tensor(ids[1:])
            loss_mask[j, p - 1: p - 1 + r] = 1.0
            if s.rollout_logprobs:
                rollout[j, p - 1: p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
            adv[j] = float(s.advantage)
        pos = torch.arange(s_len).unsqueeze(0).expand(b, s_len).contiguous()
        out.append(MicroBatch(tokens, pos, labels, loss_mask, adv, rollout))
    return out
