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
one is generated again from its paragraphs with the current weights and the same seeds (``regenerate``,
logged). The background thread only talks HTTP to the rollout servers: no collective runs on it. A batch that
failed there is collected again in the main thread, where a dead launched server is restarted
(``trainer/connect.recover_rollout``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from megatron_pz.algo.staleness import stalest, staleness, staleness_metrics
from megatron_pz.data.shards import Paragraph
from megatron_pz.errors import CheckpointError, RolloutError
from megatron_pz.types import Sample, Status, Task

if TYPE_CHECKING:
    from megatron_pz.trainer.run import Run

logger = logging.getLogger(__name__)


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


def read_batch(run: Run, step: int) -> Batch:
    """This data owner's paragraphs for ``step`` (advances the corpus)."""
    per_rank = run.cfg.train.paragraphs_per_step // run.dp_size
    return Batch(step, [next(run.corpus) for _ in range(per_rank)])


def collect_batch(run: Run, batch: Batch) -> RolloutError | None:
    """Generate, score and weight ``batch`` (fills samples and ``rollout/``-prefixed metrics); returns the rollout
    failure instead of raising it. Safe on a background thread: HTTP to the rollout servers, no collective."""
    from megatron_pz.trainer.collect import StepContext, collect

    ctx = StepContext(encode=run.tokenizer.encode, decode=run.tokenizer.decode, chat_template=run.chat_template,
                      step=batch.step, dp_rank=run.dp_rank, eos_token_id=run.tokenizer.eos_token_id)
    try:
        samples, metrics = collect(batch.paragraphs, run.cfg, run.engine, ctx)
    except RolloutError as exc:
        return exc
    batch.samples, batch.metrics = samples, {f"rollout/{k}": v for k, v in metrics.items()}
    return None


def take_batch(run: Run, step: int) -> Batch | None:
    """The batch generated for ``step`` while the previous step trained (or restored from the checkpoint), once
    it is within ``rollout.max_staleness``; None when there is none. A batch whose background attempt failed, or
    that is older than the bound (a run resumed with a smaller ``max_staleness``), is collected again from its
    paragraphs with the current weights and the same seeds (logged)."""
    batch = run.prefetch.take(step)
    if batch is None:
        return None
    if batch.error is not None:
        logger.warning("step %d: the rollout generated during step %d failed (%s); generating it again",
                       step + 1, step, batch.error)
        batch.reset()
    elif batch.samples is not None and stalest(batch.samples, run.weight_version) > run.cfg.rollout.max_staleness:
        logger.warning("step %d: %d samples are %d weight versions old, over rollout.max_staleness=%d: "
                       "regenerating them with weight version %d", step + 1, len(batch.samples),
                       stalest(batch.samples, run.weight_version), run.cfg.rollout.max_staleness, run.weight_version)
        run.stale_regenerated += len(batch.samples)
        batch.reset()
    return batch


def mark_staleness(run: Run, samples: list[Sample]) -> dict[str, float]:
    """Each sample's staleness in its metadata (``hist/staleness``) and the step's staleness metrics."""
    for s in samples:
        k = staleness(s, run.weight_version)
        if k is not None:
            s.metadata["staleness"] = k
    metrics = staleness_metrics(samples, run.weight_version)
    metrics["rollout/stale_regenerated"] = float(run.stale_regenerated)  # so far in this process
    return metrics


class Prefetcher:
    """At most one batch in flight on one background thread; data owners only (others hold an idle one)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Batch, Future[None]] | None = None
        self._ready: Batch | None = None  # finished, or restored from a checkpoint

    def submit(self, run: Run, step: int) -> None:
        """Read ``step``'s paragraphs now and collect them in the background."""
        if self._pending is not None or self._ready is not None:
            raise RuntimeError(f"a rollout batch is already in flight (step {self.in_flight_step + 1})")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-prefetch")
        batch = read_batch(run, step)

        def work() -> None:
            t0 = time.perf_counter()
            batch.error = collect_batch(run, batch)
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
    import numpy as np

    d = dict(d)
    experts = d.pop("routed_experts", None)
    s = Sample(**{**d, "task": Task(d["task"]), "status": Status(d["status"])})
    if experts is not None:
        s.routed_experts = np.asarray(experts["rows"], dtype=experts["dtype"])
    return s
