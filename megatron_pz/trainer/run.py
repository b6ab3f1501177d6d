"""The run: everything built once and read by the stages of ``train.py``, with one type per field.

Built whole by ``trainer/setup.py`` and frozen: no stage assigns a field. The objects it holds change their own
state (the corpus advances inside the rollout source, the publisher counts weight versions, the checkpointer
saves and restores its parts, the non-finite counter counts, a signal sets the stop request).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_pz.config import RunConfig
from megatron_pz.logs import RunLogger
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.provider import unwrap
from megatron_pz.parallel import DataLayout
from megatron_pz.trainer.checkpointer import Checkpointer
from megatron_pz.trainer.optimizer import TrainingState
from megatron_pz.trainer.rollout_source import RolloutSource
from megatron_pz.trainer.step import NonFiniteSteps
from megatron_pz.weight_sync.publisher import WeightPublisher

ChatTemplate = Callable[[list[dict[str, str]]], str]

__all__ = ["ChatTemplate", "DataLayout", "Run", "StopRequest"]


@dataclass
class StopRequest:
    """Set by SIGUSR1/SIGTERM (``trainer/setup.install_stop_signals``): checkpoint after this step and stop."""

    _event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class Run:
    cfg: RunConfig  # resolved (``RunConfig.resolved``): what config.json records
    out: Path  # the run folder: metrics, checkpoints/, weights/, samples/, logs
    arch: ModelArch
    tokenizer: object  # HFTokenizer | SentencePieceTokenizer (model/tokenizer.py)
    training: TrainingState  # DDP-wrapped model chunks, Megatron optimizer, LR scheduler
    layout: DataLayout
    weights: WeightPublisher  # gathers the policy and pushes it as the next weight version
    rollout: RolloutSource  # corpus, rollout engine, batch in flight: the rollout stage
    checkpointer: Checkpointer  # saves and restores the parts above
    logger: RunLogger  # rank 0's sink (a disabled one elsewhere)
    nonfinite: NonFiniteSteps  # NaN/Inf steps skipped in a row (train.max_nonfinite_steps)
    chat_template: ChatTemplate | None = None  # messages -> prompt text when prompt.style is "chat"
    start_step: int = 0  # completed steps when this process started (the resume point)
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The bare model chunks (one per virtual pipeline stage), unwrapped from DDP."""
        return [unwrap(m) for m in self.training.model]

    @property
    def weight_version(self) -> int:
        """The version the rollout engine serves now (0 = the initial weights)."""
        return self.weights.version

    @property
    def is_data_owner(self) -> bool:
        return self.layout.is_data_owner

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size
