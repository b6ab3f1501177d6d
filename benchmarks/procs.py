"""Process helpers of the comparison: run one side in its own process tree and measure it from outside.

Peak memory is per side: the side's process and all its descendants, sampled every 0.1 s from /proc (PSS, so
pages shared by forked workers count once; plain RSS summed is kept too). CPU seconds come from
``getrusage(RUSAGE_CHILDREN)`` around the side, load averages from ``os.getloadavg`` before and after.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

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


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _rss_bytes(pid: int) -> int:
    """Resident set of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and all its descendants (Linux /proc). Pages shared between them count once per process."""
    return sum(_rss_bytes(p) for p in _tree(pid))


def tree_pss_bytes(pid: int) -> int:
    """PSS of ``pid`` and its descendants: each shared page is split among the processes mapping it, so forked
    workers (Megatron's checkpoint writers fork the trainer) are not counted as full copies. Falls back to RSS
    where smaps_rollup is unreadable."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))
        except (OSError, StopIteration, ValueError, IndexError):
            total += _rss_bytes(p)
    return total


def run_side(name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
             timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run one side; returns wall time, peak tree RSS, load averages; raises UserError on failure."""
    import resource

    load_before = load_average()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    peak = peak_rss = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, tree_pss_bytes(proc.pid))
            peak_rss = max(peak_rss, tree_rss_bytes(proc.pid))
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                raise UserError(f"bench: side {name!r} ran past {timeout_s:.0f} s; log: {log_path}")
            time.sleep(0.1)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise UserError(f"bench: side {name!r} failed (exit {proc.returncode}); log: {log_path}\n{tail}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the side's whole process tree (set-up and warm-up included): less sensitive than wall time to
    # other jobs on a shared machine
    return {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime - cpu0, "peak_rss_bytes": peak,
            "peak_rss_sum_bytes": peak_rss,  # plain RSS summed over the tree (double-counts shared pages)
            "max_process_rss_bytes": ru.ru_maxrss * 1024,  # the largest single process waited for so far
            "load_before": load_before, "load_after": load_average()}
