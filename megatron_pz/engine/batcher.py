"""Scheduling concurrent ``/generate`` requests onto the engine: one thread feeds it, merging and taking turns.

* merging: a pool sends one request per prompt group from many threads at once; generating them one by one
  would leave the batch dimension empty. Requests arriving within ``window_s`` with equal sampling parameters
  (but for the seed) become one piece of work, planned as one ``engine.generate`` call would be (``engine.plan_chunks``);
* taking turns: each piece of work runs one chunk (at most ``max_batch_size`` rows) per turn, round robin, and
  requests that arrive meanwhile join the rotation ahead of the piece that just ran. A request for 10 000
  samples therefore delays a 2-token request by about one of its chunks, not by all of them.

The sampling seed is not part of the merge comparison: each prompt keeps its own request's seed
(``rollout/seeds.py``) and the engine seeds every row on its own, so seeded requests batch like unseeded ones and
a seeded sample is the same whichever chunk it lands in.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Any

from megatron_pz.rollout.protocol import GenerationResult, SamplingParams
from megatron_pz.rollout.seeds import prompt_seeds

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """Prompts of one request; ``future`` resolves to their ``list[list[GenerationResult]]``."""

    prompts: list[list[int]]
    params: SamplingParams
    future: Future


@dataclass
class Work:
    """Jobs with equal sampling params (but for the seed) merged into one generate call, run chunk by chunk."""

    jobs: list[Job]
    params: SamplingParams  # the seed cleared: each prompt's own seed is in ``seeds``
    prompts: list[list[int]]
    chunks: deque
    results: list[list[GenerationResult | None]] = field(default_factory=list)
    seeds: list[int | None] | None = None  # per prompt (rollout/seeds.py); None when no job is seeded

    def cancelled(self) -> bool:
        return all(job.future.cancelled() for job in self.jobs)


def _settle(future: Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve ``future`` unless its request is gone (a cancelled future refuses a result)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Batcher:
    """One thread feeding the engine: merges jobs with equal sampling params (but for the seed) arriving within a
    short window and runs the merged work one chunk per turn."""

    def __init__(self, engine: Any, window_s: float):
        """``engine``: anything with ``plan_chunks``, ``generate_chunk(prompts, params, chunk, seeds=None)`` and
        ``max_batch_size`` (an ``EmbeddedEngine``); ``seeds`` is passed only when a request is seeded."""
        self.engine = engine
        self.window_s = window_s
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rollout-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Future:
        job = Job(prompts, params, Future())
        self._queue.put(job)
        return job.future

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        active: deque[Work] = deque()
        while not self._stop.is_set():
            if not active:
                self._admit(self._collect_burst(), active)
                continue
            work = active.popleft()
            self._step(work)
            self._admit(self._drain(), active)  # newcomers go ahead of the work that just had its turn
            if work.chunks:
                active.append(work)

    def _collect_burst(self) -> list[Job]:
        """Jobs of the next burst (the engine is idle): the first one, then more while they keep arriving, until
        ``window_s`` passes without one, ``max_batch_size`` rows are waiting, or 10 windows have passed."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs = [first]
        rows = len(first.prompts) * first.params.n
        cap = time.monotonic() + 10 * self.window_s
        while rows < self.engine.max_batch_size:
            wait = min(self.window_s, cap - time.monotonic())
            if wait <= 0:
                break
            try:
                job = self._queue.get(timeout=wait)
            except queue.Empty:
                break
            jobs.append(job)
            rows += len(job.prompts) * job.params.n
        return jobs

    def _drain(self) -> list[Job]:
        """Jobs that arrived while the engine was busy (no waiting: others' work is queued)."""
        jobs = []
        while True:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                return jobs

    def _admit(self, jobs: list[Job], active: deque) -> None:
        groups: dict[SamplingParams, list[Job]] = {}
        for job in jobs:
            groups.setdefault(replace(job.params, seed=None), []).append(job)
        for params, group in groups.items():
            prompts = [p for job in group for p in job.prompts]
            seeds = [s for job in group for s in prompt_seeds(job.params.seed, len(job.prompts))]
            try:
                chunks = self.engine.plan_chunks(prompts, params)
            except Exception as exc:  # noqa: BLE001 - the server checks each request first; this catches the rest
                for job in group:
                    _settle(job.future, exc=exc)
                continue
            active.append(Work(group, params, prompts, deque(chunks), [[None] * params.n for _ in prompts],
                               seeds if any(x is not None for x in seeds) else None))

    def _step(self, work: Work) -> None:
        """Run the next chunk of ``work``; resolve its jobs once the last one is done (or one failed)."""
        if work.cancelled():  # every client of this work has gone: do not spend the engine on it
            work.chunks.clear()
            return
        chunk = work.chunks.popleft()
        try:
            if work.seeds is None:
                out = self.engine.generate_chunk(work.prompts, work.params, chunk)
            else:
                out = self.engine.generate_chunk(work.prompts, work.params, chunk, seeds=work.seeds)
        except Exception as exc:  # answered to every waiting request; the batcher keeps serving
            logger.exception("engine.generate failed for %d prompts", len(work.prompts))
            work.chunks.clear()
            for job in work.jobs:
                _settle(job.future, exc=exc)
            return
        for (i, j), res in zip(chunk, out):
            work.results[i][j] = res
        if work.chunks:
            return
        start = 0
        for job in work.jobs:
            _settle(job.future, work.results[start:start + len(job.prompts)])
            start += len(job.prompts)
