"""Wall time per phase of a training step (rollout / train / sync / save / eval). Pure: runs on any rank."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from time import perf_counter


class StepTimer:
    """Wall time per phase of a step: ``with timer("rollout"): ...`` adds to that phase's total.

    ``summary()`` gives ``{"time/<phase>": seconds, ..., "time/step": seconds since reset()}`` for the phases
    timed since the last ``reset()`` (phases may nest or repeat; each sums its own wall time).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._totals: dict[str, float] = {}
        self._start = perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase == "step":
            raise ValueError('"step" is the whole-step total; name the phase something else')
        t0 = perf_counter()
        try:
            yield
        finally:
            self._totals[phase] = self._totals.get(phase, 0.0) + perf_counter() - t0

    def summary(self) -> dict[str, float]:
        out = {f"time/{phase}": seconds for phase, seconds in self._totals.items()}
        out["time/step"] = perf_counter() - self._start
        return out
