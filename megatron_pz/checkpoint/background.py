"""Checkpoint writes that run beside training: Megatron-Core's asynchronous ``torch_dist`` save, one at a time.

``sharded.save(..., background=saves)`` does the collective, quick part of a save in the caller (state dict,
``common.pt``, the save plan, ``megatron_pz.json``) and hands the shard writes to ``BackgroundSaves``, which
runs them in a forked process through Megatron-Core's ``AsyncCallsQueue`` (what Megatron-LM's ``--async-save``
uses). The finalize functions run in the trainer once every rank's write is done: Megatron's (``.metadata``,
``metadata.json``), then ours (fsync, rename ``.iter_N.tmp`` -> ``iter_N``, tracker, ``keep_last``). So the
tracker names a checkpoint only once all of it is durable; a kill before that leaves the previous one current.

At most one save is in flight: a new save, and the end of the run, wait for the previous one. Finalizing is
collective (an all-reduce asks whether every rank's writer is done): every rank calls ``poll`` / ``wait`` at
the same points. A failed write (disk full, a writer killed) raises ``CheckpointError`` at the next finalize,
on every rank, and the tracker keeps naming the previous checkpoint.

Tensors the next step changes: Megatron's writer stages GPU tensors to host memory before the save returns
(``preload_fn``); CPU tensors it keeps by reference (it clones only views into larger storage). The copy that
protects them on CPU is the fork itself: the writer is a ``fork`` of the trainer (``TemporalAsyncCaller``), so
it sees the memory as it was at the fork, and the trainer's later in-place updates (optimizer step, weight
sync) copy pages on write instead of reaching the writer. Megatron's persistent worker (``spawn``, tensors sent
through a queue into shared memory) would share them live, so it is not used here.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_pz.checkpoint.layout import FIX_AND_RESUME, tracker_line
from megatron_pz.errors import CheckpointError

logger = logging.getLogger(__name__)

WRITE_DELAY_ENV = "MEGATRON_PZ_CHECKPOINT_WRITE_DELAY_S"
"""Tests only: the background writer sleeps this many seconds before writing (a kill -9 test's window)."""


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the trainer dies, so a killed run leaves no writer behind (Linux)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux/glibc
        pass


def _write(write: Callable[..., None], seconds: Any, *args: Any, **kwargs: Any) -> None:
    """The forked writer: Megatron's shard write, timed into ``seconds`` (a fork-shared double)."""
    _die_with_parent()
    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0.0)
    if delay > 0:
        time.sleep(delay)
    t0 = time.perf_counter()
    write(*args, **kwargs)
    seconds.value = time.perf_counter() - t0


class BackgroundSaves:
    """Megatron-Core's ``AsyncCallsQueue`` holding at most one checkpoint write (see the module docstring)."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        # persistent=False: a fresh fork per save (TemporalAsyncCaller), which is what keeps CPU tensors safe.
        self._queue = AsyncCallsQueue(persistent=False)
        self._pending: str | None = None  # the iteration folder being written, for messages
        self._folder: Path | None = None  # where it is written
        self._seconds: Any = None
        self.last_write_s: float | None = None  # the writer's time for the last finalized save
        self.finished_s: list[float] = []  # the writers' times of the saves finalized so far (the caller drains it)

    @property
    def in_flight(self) -> str | None:
        return self._pending

    def schedule(self, request: Any, name: str, folder: Path | None = None) -> None:
        """Start writing ``request`` (Megatron's AsyncRequest, finalize functions included) in the background;
        ``folder``: where it writes (named, and removed, if the write fails)."""
        import multiprocessing

        self._seconds = multiprocessing.get_context("fork").Value("d", -1.0, lock=False)
        if request.async_fn is not None:  # None: this rank holds no shard to write (replicas on other ranks)
            request = request._replace(async_fn=partial(_write, request.async_fn, self._seconds))
        self._queue.schedule_async_request(request)
        self._pending, self._folder = name, folder
        logger.info("checkpoint %s: writing in the background", name)

    def poll(self) -> bool:
        """Finalize the write in flight if every rank's writer is done (collective). True when none is left."""
        return self._finalize(blocking=False)

    def wait(self) -> None:
        """Wait for the write in flight and finalize it (collective)."""
        self._finalize(blocking=True)

    def abort(self) -> None:
        """Kill the writer without finalizing (this rank only): its checkpoint is dropped, the tracker stays."""
        if self._pending is not None:
            logger.warning("checkpoint %s: background write abandoned; the tracker names the previous checkpoint",
                           self._pending)
            self._queue.close(abort=True)
            self._pending = None

    def _finalize(self, blocking: bool) -> bool:
        if self._pending is None:
            return True
        name = self._pending
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
            self._pending, folder = None, self._folder
            if folder is None:
                raise CheckpointError(f"the background write of checkpoint {name} failed ({_describe(exc)}); the "
                                      f"tracker still names the previous checkpoint") from exc
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                shutil.rmtree(folder, ignore_errors=True)  # a torn folder would only hold on to the space
            raise CheckpointError(f"the background write of checkpoint {name} to {folder} failed ({_describe(exc)}); "
                                  f"{tracker_line(folder.parent)}: {FIX_AND_RESUME}") from exc
        if not done:
            return False
        self._pending = None
        self.last_write_s = self._seconds.value if self._seconds.value >= 0 else None
        if self.last_write_s is not None:
            self.finished_s.append(self.last_write_s)
        logger.info("checkpoint %s: written in the background (%s s)", name,
                    f"{self.last_write_s:.2f}" if self.last_write_s is not None else "-")
        return True


def _describe(exc: BaseException) -> str:
    """One line for a failed write: torch's CheckpointException carries each failed rank's error (on the
    coordinator rank; the others learn only that a write failed)."""
    failures = getattr(exc, "failures", None)
    if failures is None:
        return f"{exc.__class__.__name__}: {str(exc)[:300]}"
    if not failures:
        return "a rank's write failed; rank 0's log names the error"
    parts = []
    for rank, wrapped in sorted(failures.items()):
        err = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        cause = err.__cause__ or err
        parts.append(f"rank {rank}: {cause.__class__.__name__}: {str(cause)[:300]}")
    return "; ".join(parts)
