"""benchmarks.peaks on hand-made /proc reads, and benchmarks.procs.run_side on a real process tree."""
import sys

import pytest

from benchmarks import peaks, procs

MB = 1 << 20


def test_parse_vm_hwm_reads_kb_and_misses_cleanly():
    text = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t   100 kB\n"
    assert peaks.parse_vm_hwm(text) == 12345 * 1024
    assert peaks.parse_vm_hwm("Name:\tkthreadd\nState:\tS (sleeping)\n") is None


def test_descendants_walks_the_tree_parents_first():
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 99}
    got = peaks.descendants(10, parents)
    assert sorted(got) == [(11, 10), (12, 10), (13, 11)]
    assert got.index((11, 10)) < got.index((13, 11))
    assert peaks.descendants(13, parents) == []


def test_forked_copies_are_left_out_and_exec_restarts_the_mark():
    t = peaks.TreePeaks(root=100)
    t.see(100, None, b"python\0train", 500 * MB)
    t.see(101, 100, b"python\0server", 200 * MB)   # a started program: counted
    t.see(102, 100, b"python\0train", 520 * MB)    # forked without exec: the trainer's pages again
    t.see(103, 100, b"python\0train", 480 * MB)    # seen between fork and exec ...
    t.see(103, 100, b"python\0worker", 30 * MB)    # ... then exec'd: its own, new mark
    t.see(101, 100, b"python\0server", 150 * MB)   # a mark never drops
    t.see(101, 100, b"", None)                     # a zombie: no read
    s = t.summary()
    assert s["peak_rss_bytes"] == (500 + 200 + 30) * MB
    assert s["forked_copies"] == 1 and s["forked_peak_bytes"] == 520 * MB
    assert {p["pid"]: p["forked"] for p in s["processes"]} == {100: False, 101: False, 102: True, 103: False}


CHILD = ("import os, subprocess, sys, time\n"
         "big = bytearray(b'x') * (200 << 20)\n"                      # 200 MB of touched pages in the root
         "c = subprocess.Popen([sys.executable, '-c', \"b = bytearray(b'y') * (100 << 20); import time; "
         "time.sleep(2.5)\"])\n"                                      # a started program with 100 MB
         "pid = os.fork()\n"                                          # a copy-on-write copy of the root
         "if pid == 0:\n    time.sleep(2.5); os._exit(0)\n"
         "os.waitpid(pid, 0); c.wait()\n")


def test_run_side_sums_started_programs_not_forked_copies(tmp_path):
    info = procs.run_side("probe", [sys.executable, "-c", CHILD], tmp_path / "probe.log")
    # root ~210 MB + child ~110 MB; with the forked copy (~210 MB) it would be ~530 MB
    assert 300 * MB < info["peak_rss_bytes"] < 420 * MB, info["processes"]
    assert info["forked_copies"] == 1 and info["forked_peak_bytes"] > 200 * MB
    assert info["max_process_rss_bytes"] >= 200 * MB
    assert info["wall_s"] > 2.0 and info["cpu_s"] > 0
    # the bench's own cost: a few /proc reads a second
    assert 0 <= info["monitor_cpu_s"] < 0.1 * info["wall_s"]
    assert "high-water mark" in info["memory_method"]


def test_run_side_failure_names_the_side_and_log(tmp_path):
    with pytest.raises(procs.UserError, match=r"side 'bad' failed \(exit 3\); log: .*bad.log"):
        procs.run_side("bad", [sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "bad.log")
