"""``RunLogger``: the rank-0 sink of a training run, composing the metric files and the console.

Never touches ``torch.distributed``: the trainer reduces metrics across ranks and calls ``RunLogger`` on global
rank 0; every other rank builds it with ``enabled=False`` and each call returns at once.

Files under ``out_dir`` (see ``logs.writers``):
  * ``metrics.jsonl``: one line per step, ``{"step": s, "time": unix_seconds, **scalars}``;
  * ``data_order.jsonl``: the paragraphs each step trained on (a resumed run can be checked against an
    uninterrupted one);
  * ``tensorboard/``: event files, the scalar names are the tags;
  * ``samples/step_{step:07d}.jsonl``: up to ``k`` samples per task, every time the trainer calls
    ``log_samples`` (it decides the period);
  * with ``wandb`` (the keyword arguments of ``logs.writers.WandbLog``): the scalars in a W&B run as well.
Console: where the run starts (fresh or resumed), one line per logged step on stdout (``logs.console.step_line``)
and, optionally, a progress bar on stderr.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_pz.logs.console import ProgressBar, say, step_line
from megatron_pz.logs.writers import SampleDump, StepLog, TensorBoardLog, WandbLog, sample_markdown, to_number
from megatron_pz.types import Sample


class RunLogger:
    """Rank-0 sink for one training run; with ``enabled=False`` every method is a no-op and nothing is created.

    ``start_step`` is the first step number this process will log: lines at or after it left by a killed run are
    dropped. ``steps_done`` is how many steps were completed before this process (default ``start_step``, for
    0-based step numbers; the trainer numbers steps by completed count, 1-based, and passes ``start_step - 1``).
    The progress bar shows ``steps_done + (step - start_step + 1)`` of ``total_steps`` after ``log_step(step)``;
    a line logged before ``start_step`` (the initial-weights eval) leaves it alone.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        steps_done: int | None = None,
        tensorboard: bool = True,
        wandb: dict[str, Any] | None = None,
        progress_bar: bool = True,
        enabled: bool = True,
        resumed_from: str | Path | None = None,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.steps_done = start_step if steps_done is None else steps_done
        self._metrics: StepLog | None = None
        self._data: StepLog | None = None
        self._tb: TensorBoardLog | None = None
        self._wandb: WandbLog | None = None
        self._bar: ProgressBar | None = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = StepLog(self.out_dir / "metrics.jsonl", start_step)
        self._data = StepLog(self.out_dir / "data_order.jsonl", start_step)
        self._samples = SampleDump(self.out_dir / "samples", start_step)
        if tensorboard:
            self._tb = TensorBoardLog(self.out_dir / "tensorboard", start_step)
        if wandb is not None:
            self._wandb = WandbLog(self.out_dir, **wandb)
        if self.steps_done:
            where = f"resumed from {resumed_from}" if resumed_from else "the last checkpoint"
            say(f"resume   after step {self.steps_done} of {total_steps} ({where})")
        else:
            say(f"start    step 1 of {total_steps} (no checkpoint to resume from)")
        if progress_bar:
            self._bar = ProgressBar(total_steps, self.steps_done)

    # ------------------------------------------------------------------------ per step
    def log_step(
        self, step: int, scalars: dict[str, float], histograms: dict[str, Sequence[float]] | None = None
    ) -> None:
        """Append one metrics line, write TensorBoard scalars/histograms, print the step's console line and
        advance the progress bar.

        Values are converted to finite Python numbers (0-d tensors, numpy scalars); anything else becomes
        ``null`` in the file and is not plotted. Scalars named "step" or "time" are ignored (the record's own).
        Histograms drop non-finite values; an empty one is skipped.
        """
        if not self.enabled:
            return
        step = int(step)
        values = {str(k): to_number(v) for k, v in scalars.items() if str(k) not in ("step", "time")}
        self._metrics.write({"step": step, "time": time.time(), **values})
        if self._tb is not None:
            self._tb.scalars(step, values)
            self._tb.histograms(step, histograms or {})
        if self._wandb is not None:
            self._wandb.scalars(step, values)
        initial = step < self.start_step
        done = self.steps_done + step - self.start_step + 1
        say(step_line(done, self.total_steps, values, initial=initial))
        if self._bar is not None and not initial:
            self._bar.advance(done, values)

    def log_samples(self, step: int, samples: Sequence[Sample], k: int) -> None:
        """Dump up to ``k`` samples per task to ``samples/step_{step:07d}.jsonl`` and TensorBoard text."""
        if not self.enabled or k <= 0 or not samples:
            return
        picked = self._samples.write(step, samples, k)
        if self._tb is not None:
            for t, group in picked.items():
                self._tb.text(int(step), f"samples/{t}", "\n\n---\n\n".join(map(sample_markdown, group)))

    def log_data_order(self, step: int, paragraph_ids: Sequence[str]) -> None:
        """One line ``{"step": s, "paragraph_ids": [...]}`` to ``data_order.jsonl``."""
        if not self.enabled:
            return
        self._data.write({"step": int(step), "paragraph_ids": [str(p) for p in paragraph_ids]})

    # ------------------------------------------------------------------------ console / teardown
    def info(self, msg: str) -> None:
        """Print a console line above the progress bar (stdout; also recorded in the run's log file)."""
        if self.enabled:
            say(msg)

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        for part in (self._bar, self._tb, self._wandb, self._metrics, self._data):
            if part is not None:
                part.close()
        self._metrics = self._data = self._tb = self._wandb = self._bar = None
