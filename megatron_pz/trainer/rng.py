"""Every rank's random generators (Python, NumPy, torch CPU) as a checkpoint part (trainer/checkpointer.py), in
JSON values: saved from every rank, each rank restores its own (a checkpoint for another world size warns)."""
from __future__ import annotations

import base64
import logging
import random
from typing import Any

import numpy as np
import torch

from megatron_pz.parallel import gather_to_all

logger = logging.getLogger("megatron_pz.trainer.checkpointer")


class RNGState:
    def state_dict(self) -> dict[str, Any]:
        """Collective: ``{"rng": {rank: state}}`` for every rank of the world."""
        return {"rng": {str(r): s for r, s in enumerate(gather_to_all(rng_state()))}}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        rng = meta.get("rng", {})  # absent in checkpoints written before RNG states were saved
        mine = rng.get(str(torch.distributed.get_rank()))
        if mine is not None and len(rng) == torch.distributed.get_world_size():
            set_rng_state(mine)
        elif rng:
            logger.warning("checkpoint RNG states are for %d ranks, this run has %d: RNG not restored", len(rng),
                           torch.distributed.get_world_size())


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch CPU generator states, as JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
