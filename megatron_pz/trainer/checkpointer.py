"""Everything a run saves and restores, behind one ``save``/``load`` pair over a mapping of stateful parts.

A checkpoint (Megatron-LM layout, ``megatron_pz.checkpoint`` writes and reads it) holds:
  * the model and the distributed optimizer's state, sharded (``dist_checkpointing``);
  * in ``megatron_pz.json``: the step (completed steps) and the run's name, then what each part's
    ``state_dict()`` returns, a few top-level keys it owns: the LR scheduler (``scheduler``), the weight publisher
    (``weight_version``), the rollout source (every DP rank's corpus position ``corpus`` and, with
    ``rollout.max_staleness`` > 0, every data owner's rollout batch in flight ``rollout_in_flight``), every rank's
    RNG states (``rng``). ``load_state_dict(meta)`` restores a part from the same keys.
The checkpointer calls each part's two methods and writes into no other object: adding a piece of run state means
giving its owner ``state_dict`` / ``load_state_dict`` and naming it where the run is built (trainer/setup.py).
On resume the LR schedule is the config's, continued at the checkpoint's step count
(``optimizer.ScheduleState``), so a finished run extended with a larger ``train.steps`` decays over the new total.
Saves are collective and atomic: a kill at any point leaves the previous checkpoint whole, and the tracker names
the newest. A step's checkpoint is published (renamed into place, named by the tracker) only after the loop has
written the step's log lines (``publish``), so a resumed run never starts past a step whose lines are missing.

With ``checkpoint.async_save`` the shards are written by a forked process (``checkpoint.background``) while the
next step runs. Everything else (``megatron_pz.json``, ``common.pt``: the optimizer's param groups) is taken and
written before ``save`` returns, so it is this step's state whatever the trainer does next. The tracker moves in
the finalize step (``poll`` between the next step's phases, or the wait before the next save and at the end of
the run), once every shard is durable: a kill while the write is in flight leaves the previous checkpoint current,
and the resumed run repeats the steps after it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.config import CheckpointConfig
from megatron_pz.errors import CheckpointError
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.provider import unwrap
from megatron_pz.trainer.optimizer import TrainingState

logger = logging.getLogger(__name__)

SUBDIR = ckpt.RUN_CHECKPOINT_DIR


class Stateful(Protocol):
    """A checkpoint part: its top-level keys of ``megatron_pz.json`` (JSON values; may be collective)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, meta: dict[str, Any]) -> None: ...


class Checkpointer:
    def __init__(self, out: Path, cfg: CheckpointConfig, total_steps: int, training: TrainingState | None = None,
                 arch: ModelArch | None = None, parts: Mapping[str, Stateful] | None = None, run_name: str = ""):
        """``training``: the model chunks and optimizer (of ``arch``), saved sharded; ``parts``: the rest of the
        run's state, saved and restored in this order."""
        self.root = out / SUBDIR
        self.cfg = cfg
        self.total_steps = total_steps
        self.training = training
        self.arch = arch
        self.parts: dict[str, Stateful] = dict(parts or {})
        self.run_name = run_name
        self.resumed_from: Path | None = None  # the iteration folder ``load`` restored, for the console
        self.background = ckpt.BackgroundSaves() if cfg.async_save else None
        self._unpublished: int | None = None  # a step whose checkpoint is written, waiting for its log lines

    # ------------------------------------------------------------------ when
    def due(self, step: int, stop_requested: bool = False) -> bool:
        """After the last step, on a stop request, and every ``checkpoint.save_interval`` steps."""
        interval = self.cfg.save_interval
        return step == self.total_steps or stop_requested or (interval > 0 and step % interval == 0)

    def can_resume(self) -> bool:
        return self.cfg.auto_resume and (self.root / ckpt.TRACKER).exists()

    # ------------------------------------------------------------------ save / load
    def save(self, step: int, last: bool = False) -> Path:
        """Collective: every rank contributes its shards, corpus position and RNG; returns the iteration folder.

        A synchronous save, and the ``last`` save of the process, are written here but published (renamed into
        place, named by the tracker) only by ``publish()``, which the loop calls once the step's log lines are
        written: a kill between the two repeats the step rather than losing its lines. With
        ``checkpoint.async_save`` this first waits for the previous save (at most one in flight), then starts this
        one and returns while its shards are being written; it is published between the next step's phases
        (``poll``), after this step's lines; the ``last`` save waits for its write here.
        """
        if self.background is not None:
            self.background.wait()
        meta = self._meta(step)
        later = self.background is None or last
        path = ckpt.save(self.root, step, self._chunks(), self.arch, optimizer=self.training.optimizer, meta=meta,
                         keep_last=self.cfg.keep_last, background=self.background, publish_now=not later)
        if last:
            self.finish()
        if later:
            self._unpublished = step
        return path

    def publish(self) -> None:
        """Collective: publish the checkpoint ``save`` wrote but left unpublished (nothing to do otherwise)."""
        if self._unpublished is not None:
            step, self._unpublished = self._unpublished, None
            path = ckpt.publish(self.root, step, self.cfg.keep_last)
            logger.info("checkpoint %s: published (tracker updated)", path.name)

    @property
    def writing(self) -> bool:
        """A checkpoint is being written in the background (same answer on every rank)."""
        return self.background is not None and self.background.in_flight is not None

    def poll(self) -> None:
        """Collective: publish the background save (rename, tracker) if every rank's write is done. A failed write
        raises CheckpointError here, on every rank."""
        if self.background is not None:
            self.background.poll()

    def finish(self) -> None:
        """Collective: wait for the background save, if any, and publish it."""
        if self.background is not None:
            self.background.wait()

    def close(self, clean: bool) -> None:
        """End of the process. ``clean``: every rank got here, so wait for a write in flight and publish it (and a
        checkpoint ``save`` left unpublished). After an error a collective wait could hang on a rank that is gone: a single process still publishes its write, more
        ranks drop it (the tracker names the previous checkpoint, the resumed run repeats the steps after it)."""
        if clean:
            self.finish()
            self.publish()
            return
        if not self.writing:
            return  # an unpublished checkpoint stays so: its step's lines may be missing, the resume repeats it
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1:
            try:
                self.finish()
            except Exception as exc:  # already failing: say so, and let the first error propagate
                logger.error("%s", exc)
        else:
            self.background.abort()

    def timings(self) -> dict[str, float]:
        """``time/save_background``: seconds the background writes published since the last call spent writing
        (off the step's critical path; the save phase holds only what the step waited for)."""
        if self.background is None or not self.background.finished_s:
            return {}
        seconds = sum(self.background.finished_s)
        self.background.finished_s.clear()
        return {"time/save_background": seconds}

    def save_cost_s(self, save_phase_s: float | None) -> float | None:
        """What a checkpoint costs a run that stops after it (``trainer/deadline.py``): the save phase, plus with
        ``async_save`` the last background write, which a stopping run waits for (None until one has finished)."""
        if save_phase_s is None or self.background is None:
            return save_phase_s
        if self.background.last_write_s is None:
            return None
        return save_phase_s + self.background.last_write_s

    def load(self) -> int:
        """Restore the newest checkpoint into the model, optimizer and every part (collective); returns its step."""
        info, _ = ckpt.load(self.root, self._chunks(), self.arch, optimizer=self.training.optimizer)
        meta = info.meta
        step = int(meta["step"])
        for name, part in self.parts.items():
            try:
                part.load_state_dict(meta)
            except KeyError as exc:
                raise CheckpointError(f"{info.iter_dir}/{ckpt.META} has no {exc} for the run's {name}: not a "
                                      f"checkpoint of a megatron-pz run") from exc
        self.resumed_from = info.iter_dir
        logger.info("resumed from %s at step %d (weight version %s)", info.iter_dir, step,
                    meta.get("weight_version"))
        return step

    # ------------------------------------------------------------------ the parts
    def _chunks(self) -> list[torch.nn.Module]:
        return [unwrap(m) for m in self.training.model]

    def _meta(self, step: int) -> dict[str, Any]:
        """``megatron_pz.json``'s run state: the step, then each part's keys (collective: parts gather)."""
        meta: dict[str, Any] = {"step": step, "run_name": self.run_name}
        for name, part in self.parts.items():
            state = part.state_dict()
            clash = sorted(set(state) & set(meta))
            if clash:
                raise RuntimeError(f"checkpoint part {name!r} writes keys {clash} another part owns")
            meta.update(state)
        return meta
