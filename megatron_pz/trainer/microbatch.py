"""The micro-batch both layouts build (pure): ``MicroBatch``, its loss view and the all-masked micro-batch.

The two views (model, loss) are described in ``trainer/batching.py`` (one sample per row) and
``trainer/shared_prompt.py`` (shared-prompt and packed rows); both import this module and neither the other's
internals, so the two layouts form no import circle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from megatron_pz.model.row_layout import RowLayout
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
    # None = causal; [B, 1, S, S] bool, True = masked (dense); or the RowLayout itself (segment attention,
    # model/segment_attention.py)
    attention_mask: torch.Tensor | RowLayout | None = None
    routed_experts: torch.Tensor | None = None  # [B, S, L*K] int32, -1 = unrecorded; None = no routing replay
    layout: RowLayout | None = None  # the rows' units (host ints): what attention must compute, for FLOP counts

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (a row length padded for TP / CP divisibility)."""
    return int(math.ceil(n / multiple) * multiple)


def loss_view(placed: Sequence[tuple[int, int, int, Sample]]) -> dict[str, torch.Tensor]:
    """The loss view (``trainer/batching.py``'s docstring) of samples placed in rows: ``(row, c0, c1, sample)``
    per sample.

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
                      rows=one.clone(), cols=one.clone(), layout=RowLayout.of(1, seq_len, []))
