"""The structure of a micro-batch's rows, as small integers: which columns hold a prompt and which its responses.

A row holds units side by side from column 0 (one unit per row for one sample per row or a shared-prompt group;
several for packed rows, ``trainer/shared_prompt.py``), padding after the last one:

    row           [ unit 1                              | unit 2 ...  | pad ... ]
    unit          [ prompt (P) | resp 1 (R_1) | resp 2 (R_2) | ... ]

and a query may attend to ``k <= q`` within its unit's prompt, or within its own response. One sample per row is
a unit with one response (its prompt and response then form one causal block).

The model receives a layout as its ``attention_mask`` in the form of its ``table``, ``[U, 3 + N]`` int64 on the
host: per unit its row, first column, prompt length and response lengths in column order (0 = none). A small
tensor, not an object, because Megatron's activation recomputation passes ``attention_mask`` through
``tensor_parallel.checkpoint``, which saves tensors only; on the host, because the segment core attention
(``model/segment_attention.py``) slices the sequence by these numbers (reading them from a device would sync
every layer). ``RowLayout.from_table`` turns a table back into a layout, cached by content, so every layer of a
forward (and its recomputation) shares one set of index tensors.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class Unit:
    """One prompt and the responses behind it, in row ``row`` from column ``start``."""

    row: int
    start: int
    prompt: int
    responses: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.prompt + sum(self.responses)

    def useful_pairs(self) -> int:
        """(query, key) pairs the unit's mask allows: the prompt's causal triangle, and for each response of R
        tokens its R x P prompt block and its own causal triangle."""
        p = self.prompt
        return p * (p + 1) // 2 + sum(r * p + r * (r + 1) // 2 for r in self.responses)

    def segment_pairs(self) -> int:
        """(query, key) scores the segment attention computes: P x P, and R_max x (P + R_max) per response
        (responses of one unit are padded to the longest)."""
        n, rm = len(self.responses), max(self.responses, default=0)
        return self.prompt ** 2 + n * rm * (self.prompt + rm)


_FROM_TABLE: OrderedDict = OrderedDict()  # (rows, seq_len, table content) -> RowLayout, the last few used
_FROM_TABLE_SIZE = 16  # layouts alive at once: one per micro-batch in flight (PP stages x virtual chunks)


@dataclass
class RowLayout:
    """The units of a ``[rows, seq_len]`` micro-batch (see the module docstring)."""

    rows: int
    seq_len: int
    table: torch.Tensor  # [U, 3 + N] int64 on the host: row, first column, prompt length, N response lengths
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, rows: int, seq_len: int, units: Sequence[Unit]) -> "RowLayout":
        n = max([1] + [len(u.responses) for u in units])
        table = torch.zeros(len(units), 3 + n, dtype=torch.long)
        for i, u in enumerate(units):
            table[i, :3 + len(u.responses)] = torch.tensor([u.row, u.start, u.prompt, *u.responses])
        layout = cls(rows, seq_len, table)
        layout.unit_list()  # validates
        return layout

    @classmethod
    def from_table(cls, table: torch.Tensor, rows: int, seq_len: int) -> "RowLayout":
        """The layout of a ``table`` (``[U, 3 + N]`` int64, host) for ``[rows, seq_len]``; the same object for the
        same content while it is among the last few used."""
        key = (rows, seq_len, tuple(table.shape), tuple(table.flatten().tolist()))
        layout = _FROM_TABLE.pop(key, None) or cls(rows, seq_len, table.detach().clone())
        _FROM_TABLE[key] = layout
        while len(_FROM_TABLE) > _FROM_TABLE_SIZE:
            _FROM_TABLE.popitem(last=False)
        return layout

    @staticmethod
    def is_table(mask: object) -> bool:
        """Whether an ``attention_mask`` is a layout table (2-D int64) rather than a ``[B, 1, S, S]`` bool mask."""
        return isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype == torch.long

    def unit_list(self) -> list[Unit]:
        """The units as Python integers (zero-length responses dropped), row by row in column order."""
        if "units" not in self._cache:
            units = [Unit(r, c, p, tuple(x for x in resp if x > 0)) for r, c, p, *resp in self.table.tolist()]
            units.sort(key=lambda u: (u.row, u.start))
            ends: dict[int, int] = {}
            for u in units:
                if not 0 <= u.row < self.rows or u.start < ends.get(u.row, 0) or u.start + u.length > self.seq_len:
                    raise ValueError(f"RowLayout: unit {u} overlaps another or leaves the [{self.rows}, "
                                     f"{self.seq_len}] micro-batch")
                ends[u.row] = u.start + u.length
            self._cache["units"] = units
        return self._cache["units"]

    def useful_pairs(self) -> int:
        """(query, key) pairs the masks allow, over all rows (padding attends to nothing useful: not counted)."""
        return sum(u.useful_pairs() for u in self.unit_list())

    def segment_pairs(self) -> int:
        """Scores the segment attention computes, over all rows (``Unit.segment_pairs``)."""
        return sum(u.segment_pairs() for u in self.unit_list())

    def to(self, device: torch.device) -> "RowLayout":
        """Itself: the layout stays on the host (``MicroBatch.to`` moves tensors; see the module docstring)."""
        return self

    def unit_indices(self, i: int, device: torch.device) -> dict[str, torch.Tensor | None]:
        """Index tensors of unit ``i`` (``unit_list()[i]``) on ``device``, built once per micro-batch and shared
        by every layer (N responses, R_max the longest, T = their total):

        * ``gather`` ``[N, R_max]``: offset into the unit's T response tokens of each padded slot (None when all
          responses have the same length: a plain view);
        * ``valid`` ``[T]``: the slots of ``[N * R_max]`` that hold real tokens, in column order (None likewise);
        * ``resp_mask`` ``[N, 1, R_max, P + R_max]``: True = masked (a query sees every prompt key, and in its own
          response the keys ``k <= q`` that exist);
        * ``prompt_mask`` ``[P, P]``: causal, True = masked.
        """
        key = (i, str(device))
        if key not in self._cache:
            u = self.unit_list()[i]
            lens = torch.tensor(u.responses, dtype=torch.long, device=device)
            n, rm, p = len(u.responses), max(u.responses, default=0), u.prompt
            slot = torch.arange(rm, device=device)
            real = slot[None, :] < lens[:, None]  # [N, R_max]
            ragged = bool(n) and min(u.responses) != rm
            valid = [i * rm + j for i, r in enumerate(u.responses) for j in range(r)] if ragged else None
            offsets = torch.cumsum(lens, 0) - lens  # first token of each response among the T
            gather = (offsets[:, None] + torch.minimum(slot[None, :], lens[:, None] - 1)) if ragged else None
            own = (slot[None, :] <= slot[:, None])[None] & real[:, None, :]  # [N, R_max(q), R_max(k)]
            resp_mask = torch.cat([torch.zeros(n, rm, p, dtype=torch.bool, device=device), ~own], -1)
            self._cache[key] = {
                "gather": gather, "valid": None if valid is None else torch.tensor(valid, device=device),
                "resp_mask": resp_mask.unsqueeze(1),
                "prompt_mask": torch.ones(p, p, dtype=torch.bool, device=device).triu(1),
            }
        return self._cache[key]
