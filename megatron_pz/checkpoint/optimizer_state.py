"""Two work-arounds that make Megatron's DistributedOptimizer save and restore without Apex / Transformer Engine.

Both touch only the optimizer's per-parameter state; the save/load itself lives in ``checkpoint.sharded``.
"""
from __future__ import annotations

from typing import Any

import torch


def materialise_optimizer_state(optimizer: Any) -> None:
    """A fresh torch AdamW has no per-parameter state, and without Apex/TE Megatron's DistributedOptimizer
    cannot describe (or load into) an empty state. Run Megatron's own zero-gradient dummy step first; the
    parameters it touches are overwritten by the load that follows."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if inner is not None and len(inner.state) == 0 and hasattr(o, "_init_optimizer_states_with_dummy_values"):
            with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
                o._init_optimizer_states_with_dummy_values()


def unshare_adam_steps(optimizer: Any) -> int:
    """Give every parameter's Adam state its own ``step`` tensor; returns how many were replaced.

    Without Apex/TE, Megatron's ``DistributedOptimizer.load_state_dict`` assigns *one* step tensor to every
    parameter state. torch's foreach AdamW then increments that shared tensor once per parameter, so after a
    resume the bias correction runs N times too fast (and the next save trips Megatron's equal-steps assert).
    """
    inners = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    replaced = 0
    for inner in inners:
        for st in getattr(inner, "state", {}).values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
                replaced += 1
    return replaced
