"""The policy's weight versions: gather the Megatron shards into HF tensors and push them to the rollout engine.

The one owner of the weight version. Version 0 is the weights the run started from (or resumed at); every
``push`` makes version + 1 on every rank, so checkpoints, logs and samples agree on what the engine serves.
Gathering is collective (TP/PP shards meet on global rank 0); only global rank 0 holds a sync strategy
(disk, CUDA-IPC tensor or NCCL/gloo broadcast, or the colocated engine's in-memory copy, the strategies beside
this module) and pushes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_pz.model.arch import ModelArch

if TYPE_CHECKING:
    from megatron_pz.rollout.pool import RolloutPool
    from megatron_pz.weight_sync import SyncReport, WeightSync


class WeightPublisher:
    def __init__(self, arch: ModelArch, dtype: torch.dtype, version: int = 0):
        self.arch = arch
        self.dtype = dtype  # what servers receive (rollout.weights_dtype)
        self.version = version
        self.sync: WeightSync | None = None  # the strategy, global rank 0 only (``attach``, once the engine is up)
        self.engine: RolloutPool | None = None  # this data owner's pool, told of versions pushed without it
        self.last_report: SyncReport | None = None  # the latest push (rank 0)

    def attach(self, sync: WeightSync | None, engine: RolloutPool | None) -> None:
        """Connect to the rollout engine once it is up: the push strategy (global rank 0, None elsewhere) and this
        data owner's pool (None on other ranks)."""
        self.sync, self.engine = sync, engine

    # A checkpoint's part (trainer/checkpointer.py): the version the engine serves.
    def state_dict(self) -> dict[str, int]:
        return {"weight_version": self.version}

    def load_state_dict(self, meta: dict) -> None:
        self.version = int(meta["weight_version"])

    def export(self, chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor] | None:
        """The policy as HF tensors on global rank 0, None elsewhere (collective over all ranks). Nothing for a
        strategy that reads the trainer's storage itself (``SharedWeightSync``, world size 1 only)."""
        from megatron_pz.convert.bridge import gather_hf_state_dict

        if not getattr(self.sync, "needs_tensors", True):
            return {}
        return gather_hf_state_dict(chunks, self.arch, dtype=self.dtype)

    def push(self, chunks: list[torch.nn.Module]) -> int:
        """Gather the current weights (collective) and make them version + 1 on the rollout engine."""
        return self.publish(self.export(chunks))

    def publish(self, state: dict[str, torch.Tensor] | None) -> int:
        """Make ``state`` (exported on rank 0, None elsewhere) version + 1 on every rank; returns the new version."""
        self.version += 1
        if self.sync is not None:
            self.last_report = self.sync.push(state.items(), self.version)
        elif self.engine is not None:
            self.engine.mark_updated(self.version)  # other owners' pools learn the new version
        return self.version

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
