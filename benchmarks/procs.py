"""Process helpers of the comparison: run one side in its own process tree and measure it from outside, at a cost
to the side too small to see.

Peak memory is per side: the kernel's high-water marks of the side's process and all its descendants, read once
a second (``benchmarks.peaks``, which says what the figure is). The side's CPU seconds are ``wait4``'s rusage of
its main process (its reaped descendants included), load averages ``os.getloadavg`` before and after. The bench's
own CPU seconds while the side runs (``monitor_cpu_s``, ``getrusage(RUSAGE_SELF)``) are recorded with them: the
cost of measuring, taken from the cores the side runs on.
"""
from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.peaks import MEMORY_METHOD, POLL_S, TreePeaks
from megatron_pz.errors import UserError


def require_trl() -> str:
    """TRL's version, or a one-line UserError."""
    try:
        import trl
    except ImportError:
        raise UserError("bench compare needs TRL: pip install 'megatron_pz[bench]' (or bash tools/install.sh)") \
            from None
    return trl.__version__


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_s(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


def run_side(name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
             timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run one side; returns wall and CPU time, peak memory, the bench's own CPU seconds meanwhile and load
    averages; raises UserError on failure."""
    load_before = load_average()
    self0 = _cpu_s(resource.getrusage(resource.RUSAGE_SELF))
    t0 = time.perf_counter()
    reaped: dict[str, Any] = {}
    done = threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peaks = TreePeaks(proc.pid)

        def reap() -> None:  # blocks in the kernel until the side exits: no wake-ups, and its exact exit rusage
            _, status, ru = os.wait4(proc.pid, 0)
            reaped.update(status=status, rusage=ru, wall_s=time.perf_counter() - t0)
            proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
            done.set()

        threading.Thread(target=reap, daemon=True).start()
        while not done.wait(POLL_S):
            peaks.poll()
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                done.wait()
                raise UserError(f"bench: side {name!r} ran past {timeout_s:.0f} s; log: {log_path}")
    monitor_cpu_s = _cpu_s(resource.getrusage(resource.RUSAGE_SELF)) - self0
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise UserError(f"bench: side {name!r} failed (exit {proc.returncode}); log: {log_path}\n{tail}")
    ru = reaped["rusage"]
    # wait4's ru_maxrss is not credited to the root: Linux carries a process's high-water mark
    # across exec, so a side started from a large parent (a test runner holding torch) reports the parent's RSS.
    wall = reaped["wall_s"]
    # CPU seconds of the side's whole process tree (set-up and warm-up included): less sensitive than wall time to
    # other jobs on a shared machine
    return {"wall_s": wall, "cpu_s": _cpu_s(ru), **peaks.summary(),
            "max_process_rss_bytes": ru.ru_maxrss * 1024,  # wait4's mark: includes the forking parent's RSS
            "memory_method": MEMORY_METHOD,
            "monitor_cpu_s": monitor_cpu_s, "monitor_cpu_share": monitor_cpu_s / wall if wall > 0 else float("nan"),
            "load_before": load_before, "load_after": load_average()}
