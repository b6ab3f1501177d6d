"""RPT prefix-matching reward for the next-token-reasoning baseline [RPT Eq. 3].

With ground-truth continuation bytes x̄ and prediction bytes ȳ (length l), r = 1 iff ȳ = x̄[:l] and l is a
ground-truth token boundary (l ∈ L_gt, the cumulative byte lengths of the continuation's tokens). The
prediction is the content of the last ``\\boxed{}`` after ``</think>`` and is *not* stripped: a token may start
with a space (``\\boxed{ para}``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_pz.data.parsers import extract_boxed_after_think


def prefix_match(prediction: str, target: str, gt_token_byte_ends: Sequence[int]) -> float:
    """1.0 if ``prediction``'s UTF-8 bytes are a prefix of ``target``'s ending at a token boundary [RPT Eq. 3]."""
    pred = prediction.encode("utf-8")
    n = len(pred)
    return float(n > 0 and n in set(gt_token_byte_ends) and target.encode("utf-8")[:n] == pred)


def rpt_prefix(response: str, target: str, *, gt_token_byte_ends: Sequence[int] = (), **info: Any) -> float:
    """Registry reward "rpt_prefix": extract the answer and apply ``prefix_match`` [RPT Eq. 3]."""
    answer = extract_boxed_after_think(response)
    return 0.0 if answer is None else prefix_match(answer, target, gt_token_byte_ends)
