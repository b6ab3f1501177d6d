"""What libraries print during a training run goes to its log file, so that the console stays readable.

Libraries reach a terminal in three ways; each is turned towards the log file:
  * ``warnings.warn`` (Megatron's "Apex is not installed", FutureWarnings of torch and transformers):
    ``warnings.showwarning`` hands them to the "py.warnings" logger, which only the log file shows;
  * text written to ``sys.stderr`` (tqdm progress bars, such as transformers' "Converting and de-quantizing GGUF
    tensors" bar on the first use of smollm2): ``sys.stderr`` becomes a ``LibraryStream`` that logs each line, and
    of a bar, which redraws its line with carriage returns, only the final state. Our own console lines and
    progress bar write to ``console_stream()``, the real stderr;
  * child processes: they inherit the log file's path (``LOG_FILE_ENV``) and the progress-bar switches of the HF
    libraries (``CHILD_ENV``); a process that ``parallel.spawn_local`` or Megatron's checkpoint helpers start with
    "spawn" calls ``logs.console.child_console`` before it imports its work, which sends its warnings (Megatron
    warns while it is imported) to the same file. Forked processes inherit all of this.
Text that C/C++ code writes to file descriptor 2 directly is out of reach.

The log file is known only once the config is read. Until then ``hold`` keeps records and library text in memory
(``HeldRecords``); ``configure_console`` writes them into the file, and ``release`` (the command's end) gives the
console back and prints whatever is still held, as it would have been printed without holding: a config error
still shows the warning that came before it.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import threading
import warnings
from typing import TextIO

LOG_FILE_ENV = "MEGATRON_PZ_LOG_FILE"
"""The log file of the training run a process belongs to, for its child processes (``console.child_console``)."""
CHILD_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
"""Read when huggingface_hub (so transformers) and datasets are imported: no progress bars in child processes."""
STDERR = logging.getLogger("stderr")
"""The logger of the lines libraries write to ``sys.stderr``. INFO: the log file only."""
STDERR.setLevel(logging.INFO)  # its records pass even while the root logger is at its default level (WARNING)
HELD_MAX = 10_000

_console: TextIO | None = None  # the real stderr while sys.stderr is a LibraryStream
_showwarning = None  # warnings.showwarning before ``divert``


def console_stream() -> TextIO:
    """Where the console's own lines go: the real stderr, also while library output is diverted."""
    return _console if _console is not None else sys.stderr


class LibraryStream(io.TextIOBase):
    """``sys.stderr`` while library output is diverted: each complete line becomes an INFO record of ``STDERR``.

    A progress bar rewrites its line after a carriage return; of a line only the last non-blank text between
    carriage returns is kept, so a finished bar leaves one line, its final state, and a bar in progress holds no
    more than its current state in memory.
    """

    def __init__(self, console: TextIO) -> None:
        super().__init__()
        self._console = console
        self._partial = ""
        self._lock = threading.Lock()  # the engine's and the checkpointer's threads write too
        self._local = threading.local()  # .busy: this thread is logging a line already

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # no colours, no cursor movements: this is a log file's text

    def fileno(self) -> int:
        return self._console.fileno()  # faulthandler and C extensions write there directly

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._console, "encoding", None) or "utf-8"

    def write(self, s: str) -> int:
        with self._lock:
            self._partial += str(s)
            *lines, rest = self._partial.split("\n")
            cut = rest.rfind("\r")
            self._partial = rest[cut:] if cut >= 0 and rest[cut + 1:].strip() else rest
        for line in lines:
            self._emit(line)
        return len(s)

    def finish(self) -> None:
        """Log a last line that never got its newline (a bar left unfinished)."""
        with self._lock:
            rest, self._partial = self._partial, ""
        self._emit(rest)

    def _emit(self, line: str) -> None:
        states = [part.rstrip() for part in line.split("\r") if part.strip()]
        if not states:
            return
        if getattr(self._local, "busy", False):  # a handler writing to sys.stderr (logging's handleError)
            self._console.write(states[-1] + "\n")
            return
        self._local.busy = True
        try:
            STDERR.info(states[-1])
        finally:
            self._local.busy = False


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` while diverted: the "py.warnings" logger, formatted as ``logging.captureWarnings``
    does; a warning shown into an explicit file goes there."""
    if file is not None and _showwarning is not None:
        _showwarning(message, category, filename, lineno, file, line)
        return
    logging.getLogger("py.warnings").warning("%s", warnings.formatwarning(message, category, filename, lineno, line))


def divert() -> None:
    """Send warnings and ``sys.stderr`` text to logging (idempotent). Our console writes to ``console_stream()``."""
    global _console, _showwarning
    if _console is None:
        _console = sys.stderr
        sys.stderr = LibraryStream(_console)
    if _showwarning is None:
        _showwarning = warnings.showwarning
    warnings.showwarning = _warning_to_log


class HeldRecords(logging.Handler):
    """Records kept on the root logger until the run's log file is known (the first ``HELD_MAX``)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < HELD_MAX:
            self.records.append(record)


def hold() -> None:
    """Divert library output before the log file is known: records and library text wait in memory."""
    root = logging.getLogger()
    if not any(isinstance(h, HeldRecords) for h in root.handlers):
        root.addHandler(HeldRecords())
    divert()


def take_held() -> list[logging.LogRecord]:
    """The records held so far (the holder removed), for the log file that now exists."""
    root = logging.getLogger()
    held: list[logging.LogRecord] = []
    for h in [h for h in root.handlers if isinstance(h, HeldRecords)]:
        root.removeHandler(h)
        held += h.records
    return held


def release() -> None:
    """Give ``sys.stderr`` back to the console, for the command's own last lines. Records still held (no log file
    was set up: the command failed first) are printed there, as logging would have printed them without a handler;
    then warnings are shown as before too. With a log file, later warnings (at exit) still go to it."""
    global _console, _showwarning
    if isinstance(sys.stderr, LibraryStream):
        sys.stderr.finish()
    shown = [r for r in take_held() if r.levelno >= logging.WARNING or r.name == STDERR.name]
    if _console is not None:
        sys.stderr, _console = _console, None
    logged = any(getattr(h, "megatron_pz_console", False) for h in logging.getLogger().handlers)
    if _showwarning is not None and not logged:
        warnings.showwarning, _showwarning = _showwarning, None
    for record in shown:
        sys.stderr.write(record.getMessage().rstrip("\n") + "\n")


def quiet_libraries(log_path: os.PathLike | str) -> None:
    """Switch off the progress bars of the HF libraries in this process and its future children, and name the log
    file for the children (``LOG_FILE_ENV``)."""
    os.environ[LOG_FILE_ENV] = str(log_path)
    for name, value in CHILD_ENV.items():
        os.environ.setdefault(name, value)
    if "huggingface_hub" in sys.modules:  # read its switch at import: set it now as well
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
