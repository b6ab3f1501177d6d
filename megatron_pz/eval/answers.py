"""Maths answer checking: Math-Verify in a worker process, the light checker (``extract``) as the fallback.

``check_answer(answer, target)`` compares an answer already extracted from a response (``extract.extract_answer``:
the last ``\\boxed{}``, else after "The answer is", else after ``####``) with the gold answer and says which
checker decided. Math-Verify (``math_verify.parse`` + ``verify``, sympy-based: ``\\sqrt{8}`` = ``2\\sqrt{2}``,
``\\frac{1}{2}`` = 0.5, sets, intervals, equations ``x = 3`` vs ``3``) scores whenever it can be imported; the light
checker only when it cannot. Both sides are given to Math-Verify as ``\\boxed{<answer>}``, so Math-Verify reads
exactly the extracted answer: the rule that an answer must be boxed (or marked "The answer is" / ``####``) is the
same for both checkers, and an unboxed, unmarked answer is wrong whichever checker runs.

Why a process: Math-Verify's own time limits (``parsing_timeout``, ``timeout_seconds``) use ``signal.alarm``, which
raises in any thread but the main one, and sympy can get stuck in C code that no signal interrupts. The policy's
text is untrusted, and evaluation must not hang the trainer, whichever thread runs it. So Math-Verify runs in a
child process (``answers_worker``) with its own limits, and here every request has a hard wall-clock limit
(``HARD_TIMEOUT_S``): past it the child is killed, the answer scored wrong and counted (``timeouts``), and the next
request starts a fresh child. Requests from several threads are serialised on a lock.

Before the request, an answer longer than ``MAX_ANSWER_CHARS`` or with brackets nested deeper than
``MAX_ANSWER_DEPTH`` is scored wrong without asking (the longest gold answer of the maths suites has 210
characters, the deepest 4 levels; such outputs only cost parser time), and a plain number followed by unit words
("42 dollars") keeps the number, as the light checker does, since Math-Verify knows only LaTeX units
(``\\text{ dollars}``). Verdicts are cached per (answer, gold) pair, so k identical samples, or a degenerate policy
repeating one pathological answer, cost one request.
"""
from __future__ import annotations

import atexit
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from megatron_pz.eval.extract import math_equal

logger = logging.getLogger(__name__)

LIGHT_CHECKER = "light checker"
CHECKERS = ("auto", "math-verify", "light")
"""``auto``: Math-Verify when importable, else the light checker; ``math-verify`` fails when it is not."""
MAX_ANSWER_CHARS = 1000
MAX_ANSWER_DEPTH = 12
VERDICT_CACHE = 4096
SOFT_TIMEOUT_S = 5
"""Math-Verify's own limit in the worker, per parse and per comparison (its defaults)."""
HARD_TIMEOUT_S = 30.0
"""Wall-clock limit of one request (two parses and a comparison), after which the worker is killed."""
START_TIMEOUT_S = 120.0
"""Wall-clock limit for the worker to import Math-Verify (seconds on a loaded machine)."""

_OPEN, _CLOSE = frozenset("{(["), frozenset("})]")
_UNIT_WORDS = re.compile(r"^(-?[\d.,]+)\s+[a-zA-Z]{3,}(?: [a-zA-Z]+){0,3}$")


@functools.lru_cache(maxsize=1)
def math_verify_version() -> str | None:
    """The installed Math-Verify version, or None when ``math_verify`` cannot be found (looked up once)."""
    if importlib.util.find_spec("math_verify") is None:
        return None
    try:
        return importlib.metadata.version("math-verify")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


class MathVerifyWorker:
    """One ``answers_worker`` child, started on first use and again after a kill; thread-safe."""

    def __init__(self, hard_timeout_s: float = HARD_TIMEOUT_S, soft_timeout_s: int = SOFT_TIMEOUT_S,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.hard_timeout_s, self.soft_timeout_s, self.start_timeout_s = hard_timeout_s, soft_timeout_s, \
            start_timeout_s
        self.label: str | None = None  # "math-verify X.Y.Z" once a worker has started
        self.unavailable: str | None = None  # why Math-Verify cannot run here (then the light checker scores)
        self.timeouts = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._seq = 0
        self._pid = os.getpid()

    # ---------------------------------------------------------------- process
    def _spawn(self) -> bool:
        # The child imports this copy of the package, whatever the installed one is.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "megatron_pz.eval.answers_worker", str(self.soft_timeout_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True, start_new_session=True)
        except OSError as exc:
            self.unavailable = f"cannot start the Math-Verify worker: {exc}"
            logger.warning("%s; maths answers are scored by the light checker", self.unavailable)
            return False
        self._buf = b""
        hello = self._read(self.start_timeout_s)
        if hello is None or "checker" not in hello:
            reason = (hello or {}).get("error") or f"no reply within {self.start_timeout_s:.0f} s"
            self._kill()
            self.unavailable = f"Math-Verify worker did not start: {reason}"
            logger.warning("%s; maths answers are scored by the light checker", self.unavailable)
            return False
        self.label = str(hello["checker"])
        return True

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        """The next JSON object line from the child (other lines skipped); None on timeout or end of file."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buf += chunk
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                return msg

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except (OSError, AttributeError):
                pass

    def close(self) -> None:
        """Stop the child (it exits at the end of its input; killed if it does not within 5 s)."""
        with self._lock:
            proc = self._proc
            if proc is None or os.getpid() != self._pid:
                return
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._kill()

    # ---------------------------------------------------------------- requests
    def available(self) -> bool:
        with self._lock:
            return self._ensure()

    def _ensure(self) -> bool:
        if os.getpid() != self._pid:  # a forked copy: the parent's pipes are not ours
            self._proc, self._buf, self._pid = None, b"", os.getpid()
        if self.unavailable is not None:
            return False
        if self._proc is not None and self._proc.poll() is None:
            return True
        self._proc = None
        return self._spawn()

    def equal(self, pred: str, gold: str) -> bool | None:
        """Math-Verify's verdict; False after a timeout or a crash (counted); None when it cannot run here."""
        with self._lock:
            if not self._ensure():
                return None
            assert self._proc is not None and self._proc.stdin is not None
            self._seq += 1
            try:
                self._proc.stdin.write((json.dumps({"id": self._seq, "pred": pred, "gold": gold}) + "\n").encode())
                self._proc.stdin.flush()
                reply = self._read(self.hard_timeout_s)
            except OSError:  # the child died (broken pipe)
                reply = None
            if reply is None or reply.get("id") != self._seq:
                self.timeouts += 1
                logger.warning("Math-Verify gave no verdict within %.0f s (or crashed) on an answer of %d characters;"
                               " scored wrong, worker restarted on the next request", self.hard_timeout_s, len(pred))
                self._kill()
                return False
            return bool(reply.get("ok"))


_worker: MathVerifyWorker | None = None
_worker_lock = threading.Lock()


def worker() -> MathVerifyWorker:
    """The process-wide worker (closed at exit)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = MathVerifyWorker()
            atexit.register(_worker.close)
        return _worker


def checker_label(checker: str = "auto") -> str:
    """What ``check_answer(..., checker)`` scores with here: "math-verify 0.9.0" or "light checker"."""
    if checker == "light" or (checker == "auto" and math_verify_version() is None):
        return LIGHT_CHECKER
    w = worker()
    if w.available():
        return str(w.label)
    if checker == "math-verify":
        raise RuntimeError(w.unavailable)
    return LIGHT_CHECKER


def prepare(answer: str) -> str:
    """The extracted answer as Math-Verify gets it: a number followed by plain unit words keeps the number."""
    a = answer.strip()
    m = _UNIT_WORDS.match(a)
    return m.group(1) if m else a


def nesting_depth(s: str) -> int:
    """Deepest nesting of ``{([`` brackets in ``s`` (unbalanced closers ignored)."""
    depth = deepest = 0
    for ch in s:
        if ch in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif ch in _CLOSE and depth:
            depth -= 1
    return deepest


_verdicts: dict[tuple[str, str], bool] = {}


def check_answer(answer: str | None, target: str, checker: str = "auto") -> tuple[bool, str]:
    """(correct, checker label) for an extracted ``answer`` (None = no answer found) against ``target``."""
    if checker not in CHECKERS:
        raise ValueError(f"unknown maths checker {checker!r}; expected one of {CHECKERS}")
    label = checker_label(checker)
    if label == LIGHT_CHECKER:
        return math_equal(answer, target), label
    if (answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS
            or nesting_depth(answer) > MAX_ANSWER_DEPTH):
        return False, label
    key = (prepare(answer), target.strip())
    if key in _verdicts:
        return _verdicts[key], label
    verdict = worker().equal(*key)
    if verdict is None:  # the worker stopped being available (a restart failed)
        if checker == "math-verify":
            raise RuntimeError(worker().unavailable)
        return math_equal(answer, target), LIGHT_CHECKER
    if len(_verdicts) >= VERDICT_CACHE:
        _verdicts.clear()
    _verdicts[key] = verdict
    return verdict, label
