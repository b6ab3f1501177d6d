"""Rollout/train overlap (``rollout.max_staleness`` > 0): the next step's rollout runs while this step trains.

    step t:   rollout t (taken) | submit t+1 ──────────────┐ background thread, engine at weight version t
              train t ─────────────────────────────────────┤
              wait for t+1 ────────────────────────────────┘ (the rollout ends on the weights it started with)
              sync → version t+1 | save (holds batch t+1) | log
    step t+1: rollout t+1 = the finished batch: its samples are 1 version old (staleness 1 ≤ max_staleness)

One batch is in flight at a time (slime's ``train_async.py`` schedule), so a sample is exactly one version old:
``max_staleness`` ≥ 1 is the bound a batch is checked against when it is taken, not a deeper queue. The weight
sync waits for the batch in flight, so every batch comes from one weight version and a seeded run repeats
itself: the overlap changes which weights generate a step's samples, never which samples are drawn.

The data owner (one per DP replica) reads the next step's paragraphs from the corpus in the main thread when it
submits, so the corpus position saved in a checkpoint already counts them, and the checkpoint holds the batch
(``state_dict``): what is in flight at a checkpoint is a finished batch (the save comes after the sync, which
waited for it), or a failed one, saved as its paragraphs. A resumed run trains the saved samples, exactly as the
uninterrupted run would; a batch older than the resumed run's ``max_staleness`` (e.g. resumed with 0) or a failed
one is generated again from its paragraphs with the current weights and the same seeds (logged). The background
thread only talks HTTP to the rollout servers: no collective runs on it. A batch that failed there is collected
again in the main thread, where a dead launched server is restarted (``trainer/connect.Engine.recover``).
What to do with a batch (read, collect, take within the bound) is the rollout source's
(``trainer/rollout_source.py``); this module holds the batch, the one-batch queue and their JSON form.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np

from megatron_pz.data.shards import Paragraph
from megatron_pz.errors import CheckpointError, RolloutError
from megatron_pz.types import Sample, Status, Task


@dataclass
class Batch:
    """One step's rollout on one data owner: its paragraphs, and once collected its samples and metrics."""

    step: int  # 0-based step the batch is for
    paragraphs: list[Paragraph]
    samples: list[Sample] | None = None  # None: not collected (or to collect again)
    metrics: dict[str, float] = field(default_factory=dict)
    error: RolloutError | None = None  # the background attempt's failure
    seconds: float = 0.0  # wall time of the background collection

    def reset(self) -> None:
        """Forget the collected samples: the batch is collected again from its paragraphs."""
        self.samples, self.metrics, self.error = None, {}, None


class Prefetcher:
    """At most one batch in flight on one background thread; data owners only (others hold an idle one)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Batch, Future[None]] | None = None
        self._ready: Batch | None = None  # finished, or restored from a checkpoint

    def submit(self, batch: Batch, collect: Callable[[Batch], RolloutError | None]) -> None:
        """Collect ``batch`` (its paragraphs already read, in the caller's thread) in the background; ``collect``
        fills it and returns the rollout failure instead of raising it."""
        if self._pending is not None or self._ready is not None:
            raise RuntimeError(f"a rollout batch is already in flight (step {self.in_flight_step + 1})")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-prefetch")

        def work() -> None:
            t0 = time.perf_counter()
            batch.error = collect(batch)
            batch.seconds = time.perf_counter() - t0

        self._pending = (batch, self._executor.submit(work))

    @property
    def in_flight_step(self) -> int | None:
        """The 0-based step of the batch in flight or finished and not yet taken."""
        if self._pending is not None:
            return self._pending[0].step
        return self._ready.step if self._ready is not None else None

    def wait(self) -> Batch | None:
        """Block until the batch in flight is finished (before a weight sync and before a save); returns the
        finished batch not yet taken, if any."""
        if self._pending is not None:
            batch, fut = self._pending
            fut.result()  # collect_batch returns errors; anything raised here is a bug and propagates
            self._pending, self._ready = None, batch
        return self._ready

    def take(self, step: int) -> Batch | None:
        """The batch for ``step`` if one was prefetched (or restored), else None."""
        self.wait()
        batch, self._ready = self._ready, None
        if batch is not None and batch.step != step:
            raise CheckpointError(f"the rollout batch in flight is for step {batch.step + 1}, the run is at step "
                                  f"{step + 1}: the checkpoint does not match its run")
        return batch

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any] | None:
        """The batch in flight, finished (call ``wait`` first), as JSON values; None when there is none."""
        if self._pending is not None:
            raise RuntimeError("Prefetcher.state_dict while a batch is being generated: wait() first")
        b = self._ready
        if b is None:
            return None
        samples = None if b.samples is None or b.error is not None else [sample_to_json(s) for s in b.samples]
        return {"step": b.step, "paragraphs": [dataclasses.asdict(p) for p in b.paragraphs], "samples": samples,
                "metrics": b.metrics if samples is not None else {}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._pending = None
        self._ready = None
        if state is None:
            return
        try:
            paragraphs = [Paragraph(**p) for p in state["paragraphs"]]
            samples = None if state["samples"] is None else [sample_from_json(s) for s in state["samples"]]
            self._ready = Batch(int(state["step"]), paragraphs, samples, dict(state.get("metrics", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint's rollout batch in flight is unreadable: {exc!r}") from exc


def sample_to_json(s: Sample) -> dict[str, Any]:
    """A Sample as JSON values (``routed_experts``: the int array as nested lists with its dtype)."""
    d = dataclasses.asdict(dataclasses.replace(s, routed_experts=None))
    d["task"], d["status"] = s.task.value, s.status.value
    if s.routed_experts is not None:
        d["routed_experts"] = {"dtype": str(s.routed_experts.dtype), "rows": s.routed_experts.tolist()}
    return d


def sample_from_json(d: dict[str, Any]) -> Sample:
    d = dict(d)
    experts = d.pop("routed_experts", None)
    s = Sample(**{**d, "task": Task(d["task"]), "status": Status(d["status"])})
    if experts is not None:
        s.routed_experts = np.asarray(experts["rows"], dtype=experts["dtype"])
    return s
