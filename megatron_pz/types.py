"""The one record type that flows through the pipeline: corpus -> rollout -> reward -> advantage -> batch.

No logic lives here beyond trivial derived properties; every stage reads and fills fields of ``Sample``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Task(str, enum.Enum):
    """Which task produced a sample. Both PretrainZero tasks share one policy and one GRPO update."""

    MASK_GEN = "mask_gen"  # paragraph -> thinking + \mask{span}            [PZ §3.2]
    MASK_PRED = "mask_pred"  # masked paragraph -> reasoning + \boxed{span}  [PZ §3.2]
    RANDOM_SPAN = "random_span"  # Random-span RLPT baseline: prediction on a random span [PZ §4.2]
    NEXT_TOKEN = "next_token"  # RPT next-token reasoning baseline [RPT Eq. 3]
    SFT_SPAN = "sft_span"  # supervised warm-up: a random span's answer, teacher-forced (not in the paper)


class Status(str, enum.Enum):
    """Lifecycle of a sample. Only COMPLETED and TRUNCATED samples carry response tokens into the loss."""

    PENDING = "pending"  # prompt built, not generated yet
    COMPLETED = "completed"  # generation stopped on EOS / a stop string
    TRUNCATED = "truncated"  # generation hit max_new_tokens
    ABORTED = "aborted"  # the rollout engine failed or the request was cancelled; never trained on
    FILTERED = "filtered"  # dropped on purpose (DAPO zero-variance group, invalid mask, ...)


@dataclass
class Sample:
    """One prompt/response pair and everything computed about it.

    Invariants:
      * ``group_id`` names the GRPO group: all samples sharing it are normalised together and are kept on
        one data-parallel rank, so group advantages need no communication.
        Generator group = the masks of one paragraph; predictor group = the answers to one mask.
      * ``weight_version`` is the policy version that generated ``response_ids``; the trainer compares it
        with its own version to measure staleness.
      * ``rollout_logprobs[i]`` is log pi_rollout(response_ids[i] | prefix), same length as ``response_ids``.
    """

    task: Task
    group_id: str
    prompt_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    response_text: str = ""
    response_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    status: Status = Status.PENDING
    finish_reason: str | None = None
    weight_version: int = -1
    reward: float | None = None
    advantage: float | None = None
    # MoE routing replay: the experts the rollout engine routed each token to, int array (P + R - 1, L * K)
    # (rollout/protocol.py GenerationResult.routed_experts); None when not recorded.
    routed_experts: Any = None
    # Task payload: paragraph id/text, span, masked paragraph, target answer, ... (JSON-serialisable).
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        """True when the sample contributes tokens to the policy loss."""
        return (
            self.status in (Status.COMPLETED, Status.TRUNCATED)
            and self.advantage is not None
            and len(self.response_ids) > 0
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)
