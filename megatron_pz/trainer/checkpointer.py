"""Everything a run saves and restores, behind one ``save``/``load`` pair.

A checkpoint (Megatron-LM layout, ``megatron_pz.checkpoint`` writes and reads it) holds:
  * the model and the distributed optimizer's state, sharded (``dist_checkpointing``);
  * in ``megatron_pz.json``: step (completed steps), weight version, the LR scheduler, every DP rank's corpus
    position, and every rank's RNG states (Python, NumPy, torch CPU); with ``rollout.max_staleness`` > 0 also
    every data owner's rollout batch in flight (the next step's samples, ``trainer/overlap.py``).
On resume the LR schedule is the config's, continued at the checkpoint's step count (``restore_scheduler``), so a
finished run extended with a larger ``train.steps`` decays over the new total.
Adding a piece of run state means editing ``_state`` and ``_restore`` here, nothing else. Saves are collective
and atomic: a kill at any point leaves the previous checkpoint whole, and the tracker names the newest.

With ``checkpoint.async_save`` the shards are written by a forked process (``checkpoint.background``) while the
next step runs. Everything else (``megatron_pz.json``: step, scheduler, corpus positions, RNG; ``common.pt``:
the optimizer's param groups) is taken and written before ``save`` returns, so it is this step's state whatever
the trainer does next. The tracker moves in the finalize step (``poll`` between the next step's phases, or the
wait before the next save and at the end of the run), once every shard is durable: a kill while the write is in
flight leaves the previous checkpoint current, and the resumed run repeats the steps after it.
"""
from __future__ import annotations

import base64
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.errors import ConfigError
from megatron_pz.parallel import gather_to_all
from megatron_pz.trainer.optimizer import restore_scheduler

if TYPE_CHECKING:
    from megatron_pz.config import CheckpointConfig
    from megatron_pz.trainer.run import Run

logger = logging.getLogger(__name__)

SUBDIR = ckpt.RUN_CHECKPOINT_DIR


class Checkpointer:
    def __init__(self, out: Path, cfg: CheckpointConfig, total_steps: int):
        self.root = out / SUBDIR
        self.cfg = cfg
        self.total_steps = total_steps
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
    def save(self, run: Run, step: int, last: bool = False) -> Path:
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
        meta = _state(run, step)
        later = self.background is None or last
        path = ckpt.save(self.root, step, run.chunks, run.arch, optimizer=run.training.optimizer, meta=meta,
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

    def load(self, run: Run) -> int:
        """Restore the newest checkpoint into ``run`` (collective); returns the step it was saved at."""
        info, _ = ckpt.load(self.root, run.chunks, run.arch, optimizer=run.training.optimizer)
        _restore(run, info.meta)
        self.resumed_from = info.iter_dir
        logger.info("resumed from %s at step %d (weight version %d)", info.iter_dir, run.start_step,
                    run.weight_version)
        return run.start_step


# ---------------------------------------------------------------------- what is in megatron_pz.json
def _state(run: Run, step: int) -> dict[str, Any]:
    mine = (run.dp_rank, run.corpus.state_dict()) if run.corpus is not None else None
    corpus = {str(r): s for item in gather_to_all(mine) if item is not None for r, s in [item]}
    rng = {str(r): s for r, s in enumerate(gather_to_all(rng_state()))}
    state = {"step": step, "weight_version": run.weight_version, "scheduler": run.training.scheduler.state_dict(),
             "corpus": corpus, "rng": rng, "run_name": run.cfg.name}
    # rollout.max_staleness: the next step's batch, generated during this step (trainer/overlap.py); the corpus
    # position above already counts its paragraphs
    run.prefetch.wait()
    mine = (run.dp_rank, run.prefetch.state_dict()) if run.corpus is not None else None
    flight = {str(r): f for item in gather_to_all(mine) if item is not None for r, f in [item] if f is not None}
    if flight:
        state["rollout_in_flight"] = flight
    return state


def _restore(run: Run, meta: dict[str, Any]) -> None:
    run.start_step = int(meta["step"])
    _restore_schedule(run, meta["scheduler"])
    run.weights.version = int(meta["weight_version"])
    if run.corpus is not None:
        state = meta.get("corpus", {}).get(str(run.dp_rank))
        if state is None:
            raise ConfigError(f"checkpoint has no corpus position for DP rank {run.dp_rank} (saved with a different "
                              f"data-parallel size?); resume with the DP size it was saved with")
        run.corpus.load_state_dict(state)
        run.prefetch.load_state_dict(meta.get("rollout_in_flight", {}).get(str(run.dp_rank)))
    rng = meta.get("rng", {})  # absent in checkpoints written before RNG states were saved
    mine = rng.get(str(torch.distributed.get_rank()))
    if mine is not None and len(rng) == torch.distributed.get_world_size():
        set_rng_state(mine)
    elif rng:
        logger.warning("checkpoint RNG states are for %d ranks, this run has %d: RNG not restored", len(rng),
                       torch.distributed.get_world_size())


def _restore_schedule(run: Run, saved: dict[str, Any]) -> None:
    """The checkpoint's step count on this config's LR schedule (``optimizer.restore_scheduler``); one warning
    line when the schedule changed, and one when the steps still to run would all be at lr 0."""
    scheduler = run.training.scheduler
    changed = restore_scheduler(scheduler, saved)
    rank0 = torch.distributed.get_rank() == 0
    if changed and rank0:
        logger.warning("LR schedule changed since the checkpoint: %s; continuing after step %d on this config's "
                       "schedule", ", ".join(changed), run.start_step)
    steps_left = run.cfg.train.steps - run.start_step
    lr = scheduler.get_lr(run.training.optimizer.param_groups[0])
    if steps_left > 0 and lr == 0.0 and rank0:
        logger.warning("the LR schedule is at lr 0 after step %d (optim.lr_decay_steps=%s, optim.min_lr=%s): the %d "
                       "step(s) left will not change the weights", run.start_step, run.cfg.optim.lr_decay_steps,
                       run.cfg.optim.min_lr, steps_left)


# ---------------------------------------------------------------------- RNG, JSON-safe
def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch CPU generator states, as JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
