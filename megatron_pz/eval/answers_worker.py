"""The Math-Verify process behind ``answers``: ``python -m megatron_pz.eval.answers_worker SOFT_TIMEOUT_S``.

Math-Verify (sympy + an ANTLR LaTeX parser) runs here, never in the caller's process: its own time limits use
``signal.alarm``, which works only in a process's main thread, and some sympy work (huge integer powers,
simplification of long expressions) cannot be interrupted at all. In this process Math-Verify's limits work (this
is the main thread); the caller adds a hard wall-clock limit and kills the process when even those fail.

Protocol, one JSON object per line on standard output (``json.dumps`` escapes every control character, so a line
is a message; anything else that would print there, from Python or C code, goes to standard error):

* on start: ``{"checker": "math-verify 0.9.0"}``, or ``{"error": "..."}`` when Math-Verify cannot be imported
  (the process then exits);
* request ``{"id": n, "pred": "...", "gold": "..."}`` (answers already extracted, without ``\\boxed``) ->
  ``{"id": n, "ok": true|false, "error": null|"ExceptionName"}``. Any failure, timeouts included, is ``ok:
  false``: the prediction is untrusted model output.

The process exits at the end of its standard input (the caller closed the pipe or died). It ignores SIGINT (a
Ctrl-C is the caller's to handle) and caps its address space, so a runaway integer cannot take the machine's
memory.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import signal
import sys

MEMORY_LIMIT = 4 << 30
"""Address-space cap (bytes): a MemoryError here is an answer scored wrong, not an exhausted host."""
GOLD_CACHE = 4096
"""Parsed gold answers kept (an item's k samples share one)."""


_channel = sys.stdout
"""Where replies go; everything else printed on standard output (by Python or C code) goes to standard error."""


def _send(msg: dict) -> None:
    _channel.write(json.dumps(msg) + "\n")
    _channel.flush()


def _own_stdout() -> None:
    global _channel
    try:
        sys.stdout.flush()
        _channel = os.fdopen(os.dup(1), "w", encoding="ascii")
        os.dup2(2, 1)
    except OSError:  # keep the plain standard output
        return
    sys.stdout = sys.stderr


def _limit_memory() -> None:
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):  # not Linux, or not allowed: the caller's timeout still holds
        pass


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _own_stdout()
    soft_timeout = int(argv[0]) if argv else 5
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        version = importlib.metadata.version("math-verify")
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which falls back to the light checker
        _send({"error": f"cannot import math_verify: {type(exc).__name__}: {exc}"})
        return 1
    # Math-Verify logs every timeout with the whole expression; the caller counts failures instead.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    _limit_memory()
    config = [LatexExtractionConfig(), ExprExtractionConfig()]

    def parsed(answer: str) -> list:
        # The answer is given boxed: Math-Verify's boxed extraction then reads exactly this answer.
        return parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=soft_timeout)

    golds: dict[str, list] = {}
    _send({"checker": f"math-verify {version}"})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            rid = req.get("id")
        except (ValueError, AttributeError):
            continue
        ok, error = False, None
        try:
            gold = str(req["gold"])
            if gold not in golds:
                if len(golds) >= GOLD_CACHE:
                    golds.clear()
                golds[gold] = parsed(gold)
            pred = parsed(str(req["pred"]))
            ok = bool(golds[gold]) and bool(pred) and bool(verify(golds[gold], pred, timeout_seconds=soft_timeout))
        except BaseException as exc:  # noqa: BLE001 - Math-Verify's TimeoutException is a BaseException
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                raise
            error = type(exc).__name__
        _send({"id": rid, "ok": ok, "error": error})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
