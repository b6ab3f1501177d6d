"""The run: everything built once and read by the stages of ``train.py``, with one type per field.

Built by ``trainer/setup.py``; the stages read it, and only the objects it holds change their own state
(the corpus advances, the publisher counts weight versions, the checkpointer saves and restores).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from megatron_pz.trainer.overlap import Prefetcher

if TYPE_CHECKING:  # type-only imports: building a Run never needs them at import time
    from megatron_pz.config import RunConfig
    from megatron_pz.data.corpus import CorpusReader
    from megatron_pz.engine.server import RolloutServer
    from megatron_pz.logs import RunLogger
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.tokenizer import HFTokenizer, SentencePieceTokenizer
    from megatron_pz.rollout.launcher import LaunchedServer
    from megatron_pz.rollout.pool import RolloutPool
    from megatron_pz.trainer.checkpointer import Checkpointer
    from megatron_pz.trainer.optimizer import TrainingState
    from megatron_pz.weight_sync.publisher import WeightPublisher

ChatTemplate = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class DataLayout:
    """This rank's place in the data flow: its DP replica, and whether it is that replica's data owner (TP 0,
    PP 0, CP 0), the one rank that reads the corpus and talks to the rollout engine."""

    dp_rank: int
    dp_size: int
    is_data_owner: bool


@dataclass
class Run:
    cfg: RunConfig
    out: Path  # the run folder: metrics, checkpoints/, weights/, samples/, logs
    arch: ModelArch
    tokenizer: HFTokenizer | SentencePieceTokenizer
    training: TrainingState  # DDP-wrapped model chunks, Megatron optimizer, LR scheduler
    layout: DataLayout
    checkpointer: Checkpointer
    weights: WeightPublisher  # gathers the policy and pushes it as the next weight version
    logger: RunLogger | None = None  # rank 0's sink; built once the resume point is known
    corpus: CorpusReader | None = None  # data owners only
    engine: RolloutPool | None = None  # data owners only
    servers: list[LaunchedServer] = field(default_factory=list)  # embedded servers this process launched
    colocated_server: RolloutServer | None = None  # rollout.colocate: the engine's server, a thread of this process
    stale_regenerated: int = 0  # samples over rollout.max_staleness generated again (trainer/overlap.py)
    engine_restarts: int = 0  # launched servers restarted after dying (rollout.max_engine_restarts bounds it)
    chat_template: ChatTemplate | None = None  # messages -> prompt text when prompt.style is "chat"
    start_step: int = 0  # completed steps when this process started (the resume point)
    stop_requested: bool = False  # set by SIGUSR1/SIGTERM: checkpoint after this step and stop
    # rollout.max_staleness > 0: the next step's rollout, generated while this step trains (trainer/overlap.py)
    prefetch: Prefetcher = field(default_factory=Prefetcher)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The bare model chunks (one per virtual pipeline stage), unwrapped from DDP."""
        from megatron_pz.model.provider import unwrap

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
