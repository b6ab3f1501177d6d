"""Merging concurrent ``/generate`` requests into engine calls: one thread feeds the engine.

A pool sends one request per prompt group from many threads at once; generating them one by one would leave
the batch dimension empty. Requests arriving within ``window_s`` with equal sampling parameters become one
``engine.generate`` call. The sampling seed is not part of that comparison: each prompt keeps its own request's
seed (``rollout/seeds.py``) and the engine seeds every row on its own, so seeded requests batch like unseeded ones.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from megatron_pz.rollout.protocol import SamplingParams
from megatron_pz.rollout.seeds import prompt_seeds

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """Prompts of one request; ``future`` resolves to their ``list[list[GenerationResult]]``."""

    prompts: list[list[int]]
    params: SamplingParams
    future: Future


class Batcher:
    """One thread feeding the engine: merges jobs with equal sampling params (but for the seed) arriving within a
    short window."""

    def __init__(self, engine: Any, window_s: float):
        """``engine``: anything with ``generate(prompts, params, seeds=None)`` and ``max_batch_size`` (an
        ``EmbeddedEngine``); ``seeds`` is passed only when a request is seeded."""
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
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            rows = len(first.prompts) * first.params.n
            # Keep collecting while requests keep arriving (a burst from the pool's threads), up to a cap:
            # stop after `window_s` without a new request, at max_batch_size rows, or after 10 windows.
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
            groups: dict[SamplingParams, list[Job]] = {}
            for job in jobs:
                groups.setdefault(replace(job.params, seed=None), []).append(job)
            for params, group in groups.items():
                self._run(params, group)

    def _run(self, params: SamplingParams, group: list[Job]) -> None:
        prompts = [p for job in group for p in job.prompts]
        seeds = [s for job in group for s in prompt_seeds(job.params.seed, len(job.prompts))]
        try:
            if any(s is not None for s in seeds):
                results = self.engine.generate(prompts, params, seeds=seeds)
            else:
                results = self.engine.generate(prompts, params)
        except Exception as exc:  # answered to every waiting request; the batcher keeps serving
            logger.exception("engine.generate failed for %d prompts", len(prompts))
            for job in group:
                job.future.set_exception(exc)
            return
        start = 0
        for job in group:
            job.future.set_result(results[start:start + len(job.prompts)])
            start += len(job.prompts)
