"""Training-run logging on global rank 0: ``metrics.jsonl``, TensorBoard, sample dumps and a console progress bar.

Never touches ``torch.distributed``: the trainer reduces metrics across ranks and calls ``RunLogger`` on global
rank 0; every other rank builds it with ``enabled=False`` and each call returns at once.

Files under ``out_dir``:
  * ``metrics.jsonl``: one line per step, ``{"step": s, "time": unix_seconds, **scalars}``; non-finite or
    unconvertible values are written as ``null``. Line-buffered, so a ``kill -9`` loses at most the line
    being written. On start, lines with ``step >= start_step`` (left by a killed run, or all of them on a fresh
    start) are dropped, so after a resume each step appears exactly once.
  * ``tensorboard/``: event files; scalar names such as ``"reward/mask_gen"`` are the tags. On resume the
    writer's ``purge_step`` makes TensorBoard hide the killed run's events from ``start_step`` on.
  * ``samples/step_{step:07d}.jsonl``: up to ``k`` samples per task, every time the trainer calls
    ``log_samples`` (it decides the period).

``sample_scalars`` / ``sample_histograms`` turn one step's Samples into the task metrics; ``StepTimer`` measures
the rollout/train/sync phases. Both are pure and can run on every rank.
"""
from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from time import monotonic, perf_counter
from typing import Any

import numpy as np
from tqdm import tqdm

from megatron_pz.types import Sample, Status, Task

# Metadata fields too large for a sample dump (the prompt already shows what the model saw).
_BULKY_METADATA = frozenset({"paragraph", "masked_paragraph", "context", "gt_token_byte_ends"})
# TensorBoard text is for eyeballing: cut long prompts to their tail and long responses to their head.
_TEXT_PROMPT_CHARS = 800
_TEXT_RESPONSE_CHARS = 2000
_GENERATED = (Status.COMPLETED, Status.TRUNCATED, Status.FILTERED)  # FILTERED is only set after generation


# ---------------------------------------------------------------------------- value conversion
def _number(value: Any) -> int | float | None:
    """A finite Python int/float, or None (NaN, inf, non-numbers, multi-element tensors). Never raises."""
    try:
        if hasattr(value, "item"):  # 0-d / 1-element torch tensor, numpy scalar or 0-d array
            value = value.item()
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        value = float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _jsonable(obj: Any) -> Any:
    """``obj`` with every leaf made strict-JSON-safe (non-finite floats -> None, unknown objects -> str)."""
    if isinstance(obj, enum.Enum):  # Task / Status: write the plain value
        return _jsonable(obj.value)
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # tensors and numpy arrays/scalars
        with contextlib.suppress(Exception):
            return _jsonable(obj.tolist())
    if isinstance(obj, (int, float)):
        return _number(obj)
    return str(obj)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values)


# ---------------------------------------------------------------------------- per-step sample metrics
def _by_task(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[Task(s.task).value].append(s)
    return groups


def sample_scalars(samples: Sequence[Sample]) -> dict[str, float]:
    """Task metrics of one step's Samples. A key whose sample set is empty is left out (not written as 0).

    Per task ``t`` (over all its samples unless said otherwise):
      ``count/t``; ``reward/t`` (mean over samples with a reward); ``length/t_mean``, ``length/t_max``
      (response tokens of generated samples: COMPLETED, TRUNCATED, FILTERED); ``trunc_rate/t`` (status
      TRUNCATED, or finish_reason "length" for a truncated sample the DAPO filter later marked FILTERED);
      ``abort_rate/t``; ``filtered_frac/t``.
    Generator (MASK_GEN metadata set by ``data.tasks.prediction_samples``): ``mask/valid_rate`` over samples
    that carry ``mask_valid``; ``mask/span_words_mean``, ``mask/span_chars_mean`` over valid spans.
    Predictor: ``acc/mask_pred`` = mean MASK_PRED reward (exact match, so the accuracy).
    """
    out: dict[str, float] = {}
    for t, group in _by_task(samples).items():
        n = len(group)
        out[f"count/{t}"] = float(n)
        rewards = [float(s.reward) for s in group if s.reward is not None]
        if rewards:
            out[f"reward/{t}"] = _mean(rewards)
        lengths = [len(s.response_ids) for s in group if s.status in _GENERATED]
        if lengths:
            out[f"length/{t}_mean"] = _mean(lengths)
            out[f"length/{t}_max"] = float(max(lengths))
        truncated = sum(s.status is Status.TRUNCATED or s.finish_reason == "length" for s in group)
        out[f"trunc_rate/{t}"] = truncated / n
        out[f"abort_rate/{t}"] = sum(s.status is Status.ABORTED for s in group) / n
        out[f"filtered_frac/{t}"] = sum(s.status is Status.FILTERED for s in group) / n
        if t == Task.MASK_PRED.value and rewards:
            out["acc/mask_pred"] = out[f"reward/{t}"]

    gens = [s for s in samples if s.task == Task.MASK_GEN]
    validity = [bool(s.metadata["mask_valid"]) for s in gens if "mask_valid" in s.metadata]
    if validity:
        out["mask/valid_rate"] = _mean(validity)
    spans = [s.metadata.get("span") for s in gens if s.metadata.get("mask_valid")]
    spans = [span for span in spans if isinstance(span, str)]
    if spans:
        out["mask/span_words_mean"] = _mean([len(span.split()) for span in spans])
        out["mask/span_chars_mean"] = _mean([len(span) for span in spans])
    return out


def sample_histograms(samples: Sequence[Sample]) -> dict[str, list[float]]:
    """Distributions of one step: ``hist/reward_mask_gen`` (generator rewards) and ``hist/length_<task>``
    (response tokens of generated samples). Empty distributions are left out."""
    out: dict[str, list[float]] = {}
    gen_rewards = [float(s.reward) for s in samples if s.task == Task.MASK_GEN and s.reward is not None]
    if gen_rewards:
        out["hist/reward_mask_gen"] = gen_rewards
    for t, group in _by_task(samples).items():
        lengths = [float(len(s.response_ids)) for s in group if s.status in _GENERATED]
        if lengths:
            out[f"hist/length_{t}"] = lengths
    return out


# ---------------------------------------------------------------------------- phase timer
class StepTimer:
    """Wall time per phase of a step: ``with timer("rollout"): ...`` adds to that phase's total.

    ``summary()`` gives ``{"time/<phase>": seconds, ..., "time/step": seconds since reset()}`` for the phases
    timed since the last ``reset()`` (phases may nest or repeat; each sums its own wall time).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._totals: dict[str, float] = {}
        self._start = perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase == "step":
            raise ValueError('"step" is the whole-step total; name the phase something else')
        t0 = perf_counter()
        try:
            yield
        finally:
            self._totals[phase] = self._totals.get(phase, 0.0) + perf_counter() - t0

    def summary(self) -> dict[str, float]:
        out = {f"time/{phase}": seconds for phase, seconds in self._totals.items()}
        out["time/step"] = perf_counter() - self._start
        return out


# ---------------------------------------------------------------------------- the logger
def _drop_steps_from(path: Path, start_step: int) -> None:
    """Keep only the lines of a metrics file with ``step < start_step`` (atomic rewrite; torn lines dropped)."""
    if not path.exists():
        return
    raw = path.read_text(encoding="utf-8", errors="replace")
    kept = []
    for line in raw.splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            continue  # the torn last line of a killed run, or garbage
        if isinstance(step, int) and step < start_step:
            kept.append(line + "\n")
    new = "".join(kept)
    if new == raw:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class RunLogger:
    """Rank-0 sink for one training run; with ``enabled=False`` every method is a no-op and nothing is created.

    ``start_step`` is the first step number this process will log: lines at or after it left by a killed run are
    dropped. ``steps_done`` is how many steps were completed before this process (default ``start_step``, for
    0-based step numbers; the trainer numbers steps by completed count, 1-based, and passes ``start_step - 1``).
    The progress bar shows ``steps_done + (step - start_step + 1)`` of ``total_steps`` after ``log_step(step)``;
    a line logged before ``start_step`` (the initial-weights eval) leaves it alone.
    """

    # Scalars shown after the bar when present (keep the line short).
    postfix_keys = ("reward/mask_gen", "reward/mask_pred", "reward/random_span", "mask/valid_rate", "time/step")

    def __init__(
        self,
        out_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        steps_done: int | None = None,
        tensorboard: bool = True,
        progress_bar: bool = True,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.steps_done = start_step if steps_done is None else steps_done
        self._metrics = self._writer = self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / "metrics.jsonl"
        _drop_steps_from(metrics_path, start_step)
        for stale in (self.out_dir / "samples").glob("step_*.jsonl"):
            with contextlib.suppress(ValueError):
                if int(stale.stem.removeprefix("step_")) >= start_step:
                    stale.unlink()
        self._metrics = open(metrics_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()
        # Which paragraphs each step trained on: lets a resumed run be checked against an uninterrupted one.
        data_path = self.out_dir / "data_order.jsonl"
        _drop_steps_from(data_path, start_step)
        self._data = open(data_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            # Imported here so ranks and runs without TensorBoard never need the tensorboard package.
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard discards events at steps >= start_step written by the killed run.
            # Events reach disk every flush_secs; metrics.jsonl is the per-step durable record.
            self._writer = SummaryWriter(
                str(self.out_dir / "tensorboard"), purge_step=start_step if start_step > 0 else None, flush_secs=30
            )
        if progress_bar:
            self._bar = tqdm(
                total=total_steps,
                initial=self.steps_done,
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
        # ETA: the first logged step carries warm-up (engine start, compilation), so the steady rate is
        # measured from it onwards; until a second step lands, fall back to the rate since construction.
        self._t_created = monotonic()
        self._first_logged: tuple[float, int] | None = None

    # ------------------------------------------------------------------------ per step
    def log_step(
        self, step: int, scalars: dict[str, float], histograms: dict[str, Sequence[float]] | None = None
    ) -> None:
        """Append one metrics line, write TensorBoard scalars/histograms and advance the progress bar.

        Values are converted to finite Python numbers (0-d tensors, numpy scalars); anything else becomes
        ``null`` in the file and is not plotted. Scalars named "step" or "time" are ignored (the record's own).
        Histograms drop non-finite values; an empty one is skipped.
        """
        if not self.enabled:
            return
        values = {str(k): _number(v) for k, v in scalars.items() if str(k) not in ("step", "time")}
        record = {"step": int(step), "time": time.time(), **values}
        self._metrics.write(json.dumps(record, allow_nan=False) + "\n")  # one write per line: torn at worst
        if self._writer is not None:
            for tag, value in values.items():
                if value is not None:
                    self._writer.add_scalar(tag, value, int(step))
            for tag, seq in (histograms or {}).items():
                finite = [x for x in map(_number, seq.tolist() if hasattr(seq, "tolist") else seq) if x is not None]
                if finite:
                    self._writer.add_histogram(tag, np.asarray(finite, dtype=np.float64), int(step))
        if self._bar is not None and int(step) >= self.start_step:
            self._advance_bar(self.steps_done + int(step) - self.start_step + 1, values)

    def _advance_bar(self, done: int, values: dict[str, int | float | None]) -> None:
        now = monotonic()
        if self._first_logged is None:
            self._first_logged = (now, done)
        t0, n0 = self._first_logged
        if done <= n0:
            t0, n0 = self._t_created, self.steps_done
        parts = []
        if done > n0 and now > t0:
            seconds_per_step = (now - t0) / (done - n0)
            eta = max(self.total_steps - done, 0) * seconds_per_step
            parts.append(f"eta {tqdm.format_interval(eta)}, {seconds_per_step:.3g}s/step")
        parts += [f"{k}={values[k]:.3g}" for k in self.postfix_keys if values.get(k) is not None]
        self._bar.update(done - self._bar.n)
        self._bar.set_postfix_str(", ".join(parts), refresh=True)

    def log_samples(self, step: int, samples: Sequence[Sample], k: int) -> None:
        """Dump up to ``k`` samples per task to ``samples/step_{step:07d}.jsonl`` and TensorBoard text.

        Picks round-robin over groups so the dump shows ``k`` different prompts where a step has them.
        """
        if not self.enabled or k <= 0 or not samples:
            return
        picked: dict[str, list[Sample]] = {}
        for t, group in _by_task(samples).items():
            by_group: dict[str, list[Sample]] = defaultdict(list)
            for s in group:
                by_group[s.group_id].append(s)
            columns = list(by_group.values())
            order = [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]
            picked[t] = order[:k]
        folder = self.out_dir / "samples"
        folder.mkdir(exist_ok=True)
        with open(folder / f"step_{int(step):07d}.jsonl", "w", encoding="utf-8") as f:
            for group in picked.values():
                for s in group:
                    f.write(json.dumps(_sample_record(s), allow_nan=False, ensure_ascii=False) + "\n")
        if self._writer is not None:
            for t, group in picked.items():
                self._writer.add_text(f"samples/{t}", "\n\n---\n\n".join(map(_sample_markdown, group)), int(step))

    # ------------------------------------------------------------------------ console / teardown
    def log_data_order(self, step: int, paragraph_ids: Sequence[str]) -> None:
        """One line ``{"step": s, "paragraph_ids": [...]}`` to ``data_order.jsonl``."""
        if not self.enabled:
            return
        self._data.write(json.dumps({"step": int(step), "paragraph_ids": [str(p) for p in paragraph_ids]}) + "\n")

    def info(self, msg: str) -> None:
        """Print a console line above the progress bar (stdout)."""
        if self.enabled:
            tqdm.write(msg)

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        for f in (self._metrics, getattr(self, "_data", None)):
            if f is not None:
                f.close()
        self._metrics = self._data = self._writer = self._bar = None


def _sample_record(s: Sample) -> dict[str, Any]:
    meta = {k: v for k, v in s.metadata.items() if k not in _BULKY_METADATA}
    return _jsonable({
        "task": s.task,
        "group_id": s.group_id,
        "status": s.status,
        "finish_reason": s.finish_reason,
        "reward": s.reward,
        "advantage": s.advantage,
        "weight_version": s.weight_version,
        "response_tokens": len(s.response_ids),
        "prompt_text": s.prompt_text,
        "response_text": s.response_text,
        "metadata": meta,
    })


def _sample_markdown(s: Sample) -> str:
    """Short TensorBoard text (markdown): a header line, the prompt's tail and the response's head."""
    rec = _sample_record(s)
    prompt = s.prompt_text if len(s.prompt_text) <= _TEXT_PROMPT_CHARS else "..." + s.prompt_text[-_TEXT_PROMPT_CHARS:]
    response = s.response_text[:_TEXT_RESPONSE_CHARS] + ("..." if len(s.response_text) > _TEXT_RESPONSE_CHARS else "")
    target = rec["metadata"].get("target", rec["metadata"].get("span"))
    header = (
        f"**{rec['task']}** `{rec['group_id']}` status={rec['status']} reward={rec['reward']} "
        f"advantage={rec['advantage']} tokens={rec['response_tokens']}" + (f" target=`{target}`" if target else "")
    )
    return f"{header}\n\nprompt:\n\n{_code_block(prompt)}\n\nresponse:\n\n{_code_block(response)}"


def _code_block(text: str) -> str:
    """Four-space indentation renders as a markdown code block: line breaks kept, markup inert."""
    return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"
