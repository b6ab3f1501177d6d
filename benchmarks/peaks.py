"""Peak memory of a side's process tree from the kernel's own high-water marks, read at a low rate.

Linux keeps, per process, the largest resident set it has had (``VmHWM`` in /proc/PID/status; ``ru_maxrss`` of
``wait4`` when it exits). Reading that mark is a few counters per process, so it can be read rarely without losing
the peak: the peak is kept by the kernel between reads. Only the growth of a process in its last
``POLL_S`` before exit can be missed. ``wait4``'s ru_maxrss would close that gap for the main process, but Linux
carries the mark across exec, so a side started from a large parent reports the parent's RSS; it is not used.

The side's figure is the **sum of the per-process peaks**. The processes need not peak at the same moment, so the
sum is an upper bound of the tree's simultaneous peak; the resident sets also count shared library pages once per
process. A process forked without exec (Megatron's ``torch_dist`` checkpoint writers) starts with its parent's
resident pages, shared copy-on-write, as its own RSS: adding its mark would count the parent twice, so such
copies are recorded apart (``forked_peak_bytes``) and left out of the sum, and what a copy allocates itself is not
counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

POLL_S = 1.0  # seconds between reads of the tree's high-water marks (the marks themselves never drop)


def parse_vm_hwm(status_text: str) -> int | None:
    """Bytes of the ``VmHWM:`` line of a /proc/PID/status text; None where it is absent (a kernel thread, or a
    process already past freeing its memory)."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            parts = line.split()
            return int(parts[1]) * 1024 if parts[2].lower() == "kb" else int(parts[1])
    return None


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def vm_hwm_bytes(pid: int) -> int | None:
    text = _read(f"/proc/{pid}/status")
    return parse_vm_hwm(text.decode(errors="replace")) if text is not None else None


def parent_map() -> dict[int, int]:
    """pid -> parent pid of every process (one pass over /proc/*/stat)."""
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            stat = _read(f"/proc/{d}/stat")
            try:
                out[int(d)] = int(stat.rsplit(b")", 1)[1].split()[1])  # type: ignore[union-attr]
            except (AttributeError, IndexError, ValueError):
                continue
    return out


def descendants(root: int, parents: dict[int, int]) -> list[tuple[int, int]]:
    """(pid, parent pid) of ``root``'s descendants in ``parents`` (pid -> parent pid), parents before children."""
    kids: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        for c in sorted(kids.get(p, [])):
            out.append((c, p))
            todo.append(c)
    return out


@dataclass
class Proc:
    cmdline: bytes
    parent: int | None
    forked: bool  # the same command line as its parent: forked without exec, a copy-on-write copy of it
    peak_bytes: int = 0


@dataclass
class TreePeaks:
    """The high-water marks seen so far in one process tree, per pid."""
    root: int
    procs: dict[int, Proc] = field(default_factory=dict)

    def see(self, pid: int, parent: int | None, cmdline: bytes | None, hwm: int | None) -> None:
        """Record one read of ``pid``. A changed command line is an exec: the mark restarts with the new image
        (before it, the pid was a forked copy of its parent). An empty command line (a zombie) is no read."""
        if not cmdline:
            return
        p = self.procs.get(pid)
        if p is None or p.cmdline != cmdline:
            parent_cmd = self.procs[parent].cmdline if parent in self.procs else None
            p = self.procs[pid] = Proc(cmdline, parent, forked=pid != self.root and cmdline == parent_cmd)
        if hwm is not None:
            p.peak_bytes = max(p.peak_bytes, hwm)

    def poll(self) -> None:
        """Read the marks of the root and every descendant alive now."""
        self.see(self.root, None, _read(f"/proc/{self.root}/cmdline"), vm_hwm_bytes(self.root))
        for pid, ppid in descendants(self.root, parent_map()):
            self.see(pid, ppid, _read(f"/proc/{pid}/cmdline"), vm_hwm_bytes(pid))

    def summary(self) -> dict[str, object]:
        counted = [p for p in self.procs.values() if not p.forked]
        copies = [p for p in self.procs.values() if p.forked]
        return {
            "peak_rss_bytes": sum(p.peak_bytes for p in counted),
            "processes": [{"pid": pid, "cmd": _short(p.cmdline), "peak_bytes": p.peak_bytes, "forked": p.forked}
                          for pid, p in self.procs.items()],
            "forked_copies": len(copies),
            "forked_peak_bytes": max((p.peak_bytes for p in copies), default=0),
        }


def _short(cmdline: bytes) -> str:
    return " ".join(a.decode(errors="replace") for a in cmdline.split(b"\0") if a)[:160]


MEMORY_METHOD = ("peak memory = sum over the side's processes of each one's kernel high-water mark (VmHWM, read "
                 f"every {POLL_S:g} s), forked copies left out: an upper bound of the "
                 "simultaneous peak")
