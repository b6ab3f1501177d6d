"""A wall-clock budget for the run (``train.exit_duration_mins``, Megatron-LM's ``--exit-duration-in-mins``).

Megatron-LM stops once the budget has passed, which can be too late for a job whose scheduler kills it at the
limit. Here the trainer stops early enough: after each step, before its checkpoint, it asks whether another step
and its checkpoint would still end inside the budget, estimating both by the longest seen so far in this process
(a checkpoint not yet seen is estimated as long as a step). If not, it saves now and exits with status 0; the same
command resumes. Ranks agree on stopping (``any_rank``), since the save is collective.
"""
from __future__ import annotations

import time
from collections.abc import Callable


class Deadline:
    """The budget of one process, started at ``start`` (``clock()`` seconds; now by default)."""

    def __init__(self, minutes: float | None, start: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.budget_s = minutes * 60.0 if minutes else None
        self.clock = clock
        self.start = clock() if start is None else start
        self.longest_step_s = 0.0  # a whole step without its checkpoint (rollout, train, sync, eval, log)
        self.longest_save_s: float | None = None

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.start

    def record(self, step_s: float, save_s: float | None = None) -> None:
        """A finished step: its wall time without the checkpoint, and the checkpoint's if one was written."""
        self.longest_step_s = max(self.longest_step_s, step_s)
        if save_s is not None:
            self.longest_save_s = max(self.longest_save_s or 0.0, save_s)

    def no_room_for_another_step(self, current_step_s: float = 0.0) -> bool:
        """Whether continuing could end past the budget: now + this step's checkpoint + one more step and its
        checkpoint > budget (``current_step_s``: the step in progress so far, a candidate for the longest)."""
        if self.budget_s is None:
            return False
        step = max(self.longest_step_s, current_step_s)
        save = self.longest_save_s if self.longest_save_s is not None else step
        return self.elapsed_s + step + 2 * save > self.budget_s


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (a collective: every rank must call it)."""
    import torch

    from megatron_pz import device

    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device.default_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
