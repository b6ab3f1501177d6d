"""The run folder's metric files: ``metrics.jsonl`` / ``data_order.jsonl``, TensorBoard events, sample dumps, and
the optional Weights & Biases run (one writer per backend).

Each writer owns one file (or folder) and its resume rule: what a killed run wrote at or after the step this
process starts from is dropped, so after a resume each step appears exactly once. Values are converted to
strict JSON (non-finite or unconvertible numbers -> ``null``).
"""
from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import secrets
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_pz.io import atomic_write_text
from megatron_pz.logs.stats import by_task
from megatron_pz.types import Sample

# Metadata fields too large for a sample dump (the prompt already shows what the model saw).
BULKY_METADATA = frozenset({"paragraph", "masked_paragraph", "context", "gt_token_byte_ends"})
# TensorBoard text is for eyeballing: cut long prompts to their tail and long responses to their head.
TEXT_PROMPT_CHARS = 800
TEXT_RESPONSE_CHARS = 2000


# ---------------------------------------------------------------------------- value conversion
def to_number(value: Any) -> int | float | None:
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


def to_jsonable(obj: Any) -> Any:
    """``obj`` with every leaf made strict-JSON-safe (non-finite floats -> None, unknown objects -> str)."""
    if isinstance(obj, enum.Enum):  # Task / Status: write the plain value
        return to_jsonable(obj.value)
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # tensors and numpy arrays/scalars
        with contextlib.suppress(Exception):
            return to_jsonable(obj.tolist())
    if isinstance(obj, (int, float)):
        return to_number(obj)
    return str(obj)


# ---------------------------------------------------------------------------- one line per step
def drop_steps_from(path: Path, start_step: int) -> None:
    """Keep only the lines of a step file with ``step < start_step`` (atomic rewrite; torn lines dropped)."""
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
    if new != raw:
        atomic_write_text(path, new)


class StepLog:
    """A JSON-lines file with one ``{"step": s, ...}`` record per line.

    Line-buffered, so a ``kill -9`` loses at most the line being written; on open, lines with
    ``step >= start_step`` (left by a killed run, or all of them on a fresh start) are dropped.
    """

    def __init__(self, path: Path, start_step: int) -> None:
        drop_steps_from(path, start_step)
        self._f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=False) + "\n")  # one write per line: torn at worst

    def close(self) -> None:
        self._f.close()


class TensorBoardLog:
    """Event files under ``folder``; scalar names such as ``"reward/mask_gen"`` are the tags.

    On resume ``purge_step`` makes TensorBoard hide the killed run's events from ``start_step`` on. Events reach
    disk every 30 s; ``metrics.jsonl`` is the per-step durable record.
    """

    def __init__(self, folder: Path, start_step: int) -> None:
        # Imported here so ranks and runs without TensorBoard never need the tensorboard package.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder), purge_step=start_step if start_step > 0 else None, flush_secs=30)

    def scalars(self, step: int, values: dict[str, int | float | None]) -> None:
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, value, step)

    def histograms(self, step: int, histograms: dict[str, Sequence[float]]) -> None:
        """Non-finite values are dropped; an empty histogram is skipped."""
        for tag, seq in histograms.items():
            finite = [x for x in map(to_number, seq.tolist() if hasattr(seq, "tolist") else seq) if x is not None]
            if finite:
                self._writer.add_histogram(tag, np.asarray(finite, dtype=np.float64), step)

    def text(self, step: int, tag: str, markdown: str) -> None:
        self._writer.add_text(tag, markdown, step)

    def close(self) -> None:
        self._writer.close()


class WandbLog:
    """The run's scalars in a Weights & Biases run (``logging.wandb``); online, or offline files to upload later
    with ``wandb sync``.

    The W&B run id is kept in ``<out_dir>/wandb_run_id.txt``, so a resumed training run continues the same W&B run
    (W&B itself ignores a step at or below the last one it holds, which a killed run may have logged already).
    Files go under ``$WANDB_DIR/wandb/`` when that is set, else ``<out_dir>/wandb/``. W&B's console capture is off:
    the console is ours (``logs.console``). Only scalars are sent; histograms and sample texts stay in TensorBoard
    and ``samples/``.
    """

    RUN_ID_FILE = "wandb_run_id.txt"

    def __init__(self, out_dir: Path, *, project: str, entity: str | None = None, name: str | None = None,
                 mode: str | None = None, config: dict[str, Any] | None = None) -> None:
        # Imported here: only runs with logging.wandb need the wandb package.
        import wandb

        id_file = out_dir / self.RUN_ID_FILE
        # 8 lowercase hex digits: the form of W&B's own run ids
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        atomic_write_text(id_file, run_id + "\n")
        self._run = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow", mode=mode,
                               dir=os.environ.get("WANDB_DIR") or str(out_dir), config=config,
                               settings=wandb.Settings(console="off", silent=True))

    def scalars(self, step: int, values: dict[str, int | float | None]) -> None:
        finite = {tag: value for tag, value in values.items() if value is not None}
        if finite:
            self._run.log(finite, step=step)

    def close(self) -> None:
        self._run.finish()


# ---------------------------------------------------------------------------- sample dumps
class SampleDump:
    """``samples/step_{step:07d}.jsonl``: up to ``k`` samples per task of the steps the trainer picks."""

    def __init__(self, folder: Path, start_step: int) -> None:
        self.folder = folder
        for stale in folder.glob("step_*.jsonl"):
            with contextlib.suppress(ValueError):
                if int(stale.stem.removeprefix("step_")) >= start_step:
                    stale.unlink()

    def write(self, step: int, samples: Sequence[Sample], k: int) -> dict[str, list[Sample]]:
        """Write the picked samples and return them by task (round-robin over groups, so the dump shows ``k``
        different prompts where a step has them)."""
        picked: dict[str, list[Sample]] = {}
        for t, group in by_task(samples).items():
            by_group: dict[str, list[Sample]] = defaultdict(list)
            for s in group:
                by_group[s.group_id].append(s)
            columns = list(by_group.values())
            order = [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]
            picked[t] = order[:k]
        self.folder.mkdir(exist_ok=True)
        with open(self.folder / f"step_{int(step):07d}.jsonl", "w", encoding="utf-8") as f:
            for group in picked.values():
                for s in group:
                    f.write(json.dumps(sample_record(s), allow_nan=False, ensure_ascii=False) + "\n")
        return picked


def sample_record(s: Sample) -> dict[str, Any]:
    """One sample as a JSON-safe dict (bulky metadata such as the whole paragraph left out)."""
    meta = {k: v for k, v in s.metadata.items() if k not in BULKY_METADATA}
    return to_jsonable({
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


def sample_markdown(s: Sample) -> str:
    """Short TensorBoard text (markdown): a header line, the prompt's tail and the response's head."""
    rec = sample_record(s)
    prompt = s.prompt_text if len(s.prompt_text) <= TEXT_PROMPT_CHARS else "..." + s.prompt_text[-TEXT_PROMPT_CHARS:]
    response = s.response_text[:TEXT_RESPONSE_CHARS] + ("..." if len(s.response_text) > TEXT_RESPONSE_CHARS else "")
    target = rec["metadata"].get("target", rec["metadata"].get("span"))
    header = (
        f"**{rec['task']}** `{rec['group_id']}` status={rec['status']} reward={rec['reward']} "
        f"advantage={rec['advantage']} tokens={rec['response_tokens']}" + (f" target=`{target}`" if target else "")
    )
    return f"{header}\n\nprompt:\n\n{_code_block(prompt)}\n\nresponse:\n\n{_code_block(response)}"


def _code_block(text: str) -> str:
    """Four-space indentation renders as a markdown code block: line breaks kept, markup inert."""
    return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"
