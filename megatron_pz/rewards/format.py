"""Learnability rewards: the form of the answer, not its content. They show that the loop learns; they are not
the method's reward.

A model as small as SmolLM2-135M never hits an exact-match span (docs/results.md), so exact match gives it no
signal. ``format_boxed`` rewards answering in the form the prediction prompt asks for (a non-empty final
``\\boxed{}`` [PZ Fig. 5]); ``brevity`` rewards short responses. Both have within-group variance and an optimum
the policy can reach, so a working loop raises them within a few steps (docs/learning.md). ``format_boxed``
needs responses long enough to reach a box: SmolLM2 at 48 new tokens boxed none of 80 samples in 5 steps (every
group all-zero, so DAPO filters them all); ``brevity`` trains every group.
"""
from __future__ import annotations

from typing import Any

from megatron_pz.data.parsers import extract_boxed


def format_boxed(response: str, target: str, **info: Any) -> float:
    """1.0 if the response has a balanced ``\\boxed{}`` whose last one holds non-whitespace, else 0.0.

    The last ``\\boxed{}`` is the one ``exact_match`` grades, so an empty final box scores 0 even after a
    filled one: the reward counts only answers the span rewards would read.
    """
    answer = extract_boxed(response)
    return float(answer is not None and answer.strip() != "")


BREVITY_CHARS = 128
"""The length at which ``brevity`` reaches 0: about 32 tokens of English from a SmolLM2-sized tokenizer."""


def brevity(response: str, target: str, **info: Any) -> float:
    """1 - characters / 128, floored at 0: shorter is better, whatever the answer.

    Dense (almost every two samples differ, so every GRPO group has variance and trains) and reachable (stop
    early, or pick shorter words), so a few steps of a working loop must raise it: the learning check of
    tests/e2e/test_learning.py and benchmarks/learning.py. Not a reward to pretrain with.
    """
    return max(0.0, 1.0 - len(response) / BREVITY_CHARS)
