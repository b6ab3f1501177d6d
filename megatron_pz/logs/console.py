"""The console of a training run is for people; everything else goes to the run's log file.

``configure_console(output_dir, rank)`` routes every ``logging`` record (Megatron-Core, transformers, our own
INFO details), every ``warnings.warn`` and whatever libraries write to ``sys.stderr`` (progress bars) to
``<output_dir>/train.log`` (``train.rank<N>.log`` on rank N > 0); ``logs.library_output`` says how, also for child
processes (``child_console``). The console keeps:
  * stdout, rank 0: the lines printed with ``say`` (the set-up summary, one line per step from ``RunLogger``);
  * stderr, rank 0: the progress bar and one line per warning of ours (``megatron_pz.*`` loggers);
  * stderr, every rank: one line per ERROR record of any logger, pointing at the log file for the details.
Library warnings ("Apex is not installed", deprecations) and Megatron's INFO dumps stay in the file.

torch's loggers do not reach the root: the "torch" logger has its own stderr handler and does not propagate
(``torch._logging``). The one that speaks in a training run, ``torch.utils.cpp_extension``, is handed to the root
like any library logger (``TORCH_LOGGERS_TO_FILE``).
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from time import monotonic

from tqdm import tqdm

from megatron_pz.logs.library_output import LOG_FILE_ENV, console_stream, divert, quiet_libraries, take_held

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LINES = logging.getLogger("megatron_pz.console")
"""Where ``say`` records its lines for the log file (the console copy is written directly)."""
TORCH_LOGGERS_TO_FILE = ("torch.utils.cpp_extension",)
"""torch loggers routed to the root's handlers instead of torch's stderr handler. ``cpp_extension``: the CUDA build
of torch (PyPI's for Python 3.12) warns "No CUDA runtime is found, using CUDA_HOME=..." when Megatron-Core 0.19 imports
it on a CPU machine (``tensor_parallel.random``)."""


# ---------------------------------------------------------------------------- routing
class ConsoleFilter(logging.Filter):
    """Which records reach the console: errors from anywhere; on rank 0 also our own warnings (a child process
    of a run passes rank -1: errors only)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        ours = record.name == "megatron_pz" or record.name.startswith("megatron_pz.")
        return self.rank == 0 and ours and record.levelno >= logging.WARNING and record.name != LINES.name


class ToRoot(logging.Handler):
    """Hands each record to the root logger's handlers (the log file, the console and its filter)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


class ConsoleHandler(logging.Handler):
    """One line per record on stderr, written through tqdm so a progress bar is redrawn below it, not torn.

    Only the first line of the message is shown; a traceback or further lines are left to the log file, which
    the line names.
    """

    def __init__(self, log_path: Path | None = None) -> None:
        super().__init__()
        self.log_path = log_path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            lines = record.getMessage().strip().splitlines() or [""]
            text = f"megatron-pz: {record.levelname.lower()}: {lines[0]}"
            if self.log_path is not None and (len(lines) > 1 or record.exc_info):
                text += f" (details in {self.log_path})"
            tqdm.write(text, file=console_stream())  # looked up now: sys.stderr may have been replaced
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


def configure_console(output_dir: str | Path, rank: int, level: int = logging.INFO) -> Path:
    """Send library chatter to ``<output_dir>/train.log`` (``train.rank<rank>.log`` off rank 0) and keep the
    console for people (see the module docstring). Returns the log file's path.

    Records held since ``library_output.hold`` (the config was being read) are written into the file first.
    Calling it again (a second run in one process) replaces the handlers it installed, nothing else. The file is
    appended to, so a resumed run continues the log of the run it resumes.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = (out / ("train.log" if rank == 0 else f"train.rank{rank}.log")).resolve()
    _install(path, rank, level)
    quiet_libraries(path)
    return path


def child_console() -> None:
    """In a process a training run started with "spawn" (``parallel.spawn_local``'s ranks, Megatron's checkpoint
    helpers): its warnings, records and library text go to the run's log file, its errors also to the console.
    Call it before importing the work (Megatron warns while it is imported). Outside a run, nothing changes."""
    path = os.environ.get(LOG_FILE_ENV)
    if path:
        # transformers is not imported for its handler here: imported later, it binds the diverted sys.stderr
        _install(Path(path), -1, logging.INFO, route_transformers=False)


def _install(path: Path, rank: int, level: int, route_transformers: bool = True) -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "megatron_pz_console", False)]:
        root.removeHandler(h)
        h.close()
    held = take_held()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    to_console = ConsoleHandler(path)
    to_console.addFilter(ConsoleFilter(rank))
    for h in (to_file, to_console):
        h.megatron_pz_console = True
        root.addHandler(h)
        for record in held:
            h.handle(record)
    root.setLevel(level)
    divert()  # warnings.warn and library text on sys.stderr -> records -> the file only
    for name in TORCH_LOGGERS_TO_FILE:
        torch_logger = logging.getLogger(name)
        torch_logger.propagate = False  # not up to "torch" and its stderr handler
        if not any(isinstance(h, ToRoot) for h in torch_logger.handlers):
            torch_logger.addHandler(ToRoot())
    if route_transformers:
        _route_transformers()


def _route_transformers() -> None:
    """transformers logs through its own stderr handler and draws its own progress bars: hand both to us."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


def say(msg: str) -> None:
    """A line for people on stdout (above the progress bar, if one is drawn), also recorded in the log file."""
    with tqdm.external_write_mode(file=console_stream()):  # the bar is cleared, then redrawn below the line
        sys.stdout.write(msg + "\n")
    LINES.info(msg)


# ---------------------------------------------------------------------------- one line per step
def _fmt(value: float) -> str:
    return f"{value:.3f}"


def step_line(step: int, total: int, values: Mapping[str, float | int | None], initial: bool = False) -> str:
    """The console's line for one logged step; metrics the step did not report are left out.

    ``step 3/100 | reward mask_gen 0.412 mask_pred 0.270 | acc 0.270 | masks valid 5/8 | trained 1234 tok |
    12.3s``; eval results add ``eval wiki_span 0.333``. ``initial`` marks the eval of the initial weights, logged
    before the first step.
    """
    v = {k: x for k, x in values.items() if x is not None}
    parts = ["initial weights" if initial else f"step {step}/{total}"]
    rewards = [f"{k.split('/', 1)[1]} {_fmt(x)}" for k, x in v.items() if k.startswith("reward/") and k.count("/") == 1]
    if rewards:
        parts.append("reward " + " ".join(rewards))
    if "acc/mask_pred" in v:
        parts.append(f"acc {_fmt(v['acc/mask_pred'])}")
    if "mask/valid_rate" in v:
        rate = v["mask/valid_rate"]
        count = v.get("count/mask_gen")
        parts.append(f"masks valid {round(rate * count)}/{int(count)}" if count else f"masks valid {rate:.0%}")
    if "groups_mixed/mask_pred" in v or "groups_mixed/random_span" in v:
        t = "mask_pred" if "groups_mixed/mask_pred" in v else "random_span"
        parts.append(f"mixed groups {int(v[f'groups_mixed/{t}'])}/{int(v[f'groups/{t}'])}")
    entropies = [f"{k.split('/', 1)[1]} {x:.2f}" for k, x in v.items() if k.startswith("entropy/")]
    if entropies:  # a collapse shows here first
        parts.append("entropy " + " ".join(entropies))
    truncs = [f"{k.split('/', 1)[1]} {x:.0%}" for k, x in v.items() if k.startswith("trunc_rate/") and x > 0]
    if truncs:  # answers cut at the token cap score 0 whatever they would have said
        parts.append("truncated " + " ".join(truncs))
    if "train/target_prob" in v:  # sft_span: how much of the teacher-forced answer the policy already predicts
        parts.append(f"nll {_fmt(v['train/loss'])} p(target) {_fmt(v['train/target_prob'])}")
    if "train/tokens" in v:
        parts.append(f"trained {int(v['train/tokens'])} tok")
    evals = [f"{k.split('/')[1]} {_fmt(x)}" for k, x in v.items() if k.startswith("eval/") and k.endswith("/accuracy")]
    if evals:
        parts.append("eval " + " ".join(evals))
    if "time/step" in v:
        parts.append(f"{v['time/step']:.1f}s")
    return " | ".join(parts)


class ProgressBar:
    """tqdm bar on stderr counting completed steps, with an ETA from the steady rate.

    The first step carries warm-up (engine start, compilation), so the rate is measured from it onwards; until a
    second step lands, the rate since construction stands in.
    """

    # Scalars shown after the bar when present (keep the line short).
    postfix_keys = ("reward/mask_gen", "reward/mask_pred", "reward/random_span", "reward/next_token", "mask/valid_rate",
                    "time/step")

    def __init__(self, total: int, done: int) -> None:
        self.total, self.start_done = total, done
        self._bar = tqdm(total=total, initial=done, file=console_stream(), dynamic_ncols=True,
                         bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self._t_created = monotonic()
        self._first: tuple[float, int] | None = None

    @property
    def n(self) -> int:
        return self._bar.n

    def advance(self, done: int, values: Mapping[str, float | int | None]) -> None:
        """Show ``done`` completed steps; the postfix carries the ETA and a few of ``values``."""
        now = monotonic()
        if self._first is None:
            self._first = (now, done)
        t0, n0 = self._first
        if done <= n0:
            t0, n0 = self._t_created, self.start_done
        parts = []
        if done > n0 and now > t0:
            seconds_per_step = (now - t0) / (done - n0)
            eta = max(self.total - done, 0) * seconds_per_step
            parts.append(f"eta {tqdm.format_interval(eta)}, {seconds_per_step:.3g}s/step")
        parts += [f"{k}={values[k]:.3g}" for k in self.postfix_keys if values.get(k) is not None]
        self._bar.update(done - self._bar.n)
        self._bar.set_postfix_str(", ".join(parts), refresh=True)

    def close(self) -> None:
        self._bar.close()
