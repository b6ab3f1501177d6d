"""The rollout stage of a step, in one object: paragraphs in, this rank's scored samples out.

``RolloutSource`` owns what the stage needs and counts: the corpus reader (data owners), the rollout engine
(``trainer/connect.Engine``: pool, launched or colocated servers, restart budget), the batch generated ahead
(``trainer/overlap.Prefetcher``) and its staleness bound (``rollout.max_staleness``), and the samples generated
again for being over it. The loop calls ``batch(step)`` for the step's samples and ``prefetch(step + 1)`` to
start the next step's rollout while this one trains; ``wait()`` before the weight sync; ``recover`` after a
stage's failed call to the engine. ``state_dict`` / ``load_state_dict`` make it a checkpoint part: every DP
rank's corpus position and, with overlap, every data owner's batch in flight.

Data owners (TP 0, PP 0, CP 0 of each DP replica) read and collect; ``batch`` hands their samples to the rest of
the model-parallel group. What the weights are is the publisher's: the source reads its version, never sets it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_pz.algo.staleness import stalest, staleness, staleness_metrics
from megatron_pz.config import RunConfig
from megatron_pz.data.corpus import CorpusReader
from megatron_pz.errors import ConfigError, RolloutError
from megatron_pz.parallel import DataLayout, gather_to_all, share_samples
from megatron_pz.trainer.colocate import connect_colocated
from megatron_pz.trainer.collect import StepContext, collect
from megatron_pz.trainer.connect import Engine, connect
from megatron_pz.trainer.overlap import Batch, Prefetcher
from megatron_pz.types import Sample
from megatron_pz.weight_sync.publisher import WeightPublisher

logger = logging.getLogger(__name__)

ChatTemplate = Callable[[list[dict[str, str]]], str]


class RolloutSource:
    def __init__(self, cfg: RunConfig, layout: DataLayout, tokenizer: Any, chat_template: ChatTemplate | None,
                 weights: WeightPublisher, corpus: CorpusReader | None):
        self.cfg = cfg
        self.layout = layout
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.weights = weights  # read for the version the engine serves; pushed to by the sync stage
        self.corpus = corpus  # data owners only
        self.prefetcher = Prefetcher()  # rollout.max_staleness > 0: the next step's batch, generated ahead
        self.engine: Engine | None = None  # once ``start`` connected it
        self.stale_regenerated = 0  # samples over rollout.max_staleness generated again, in this process

    # ------------------------------------------------------------------ connect
    def start(self, out: Path, chunks: list[torch.nn.Module]) -> None:
        """Connect the engine at the publisher's (restored) version. Collective."""
        connect_fn = connect_colocated if self.cfg.rollout.colocate else connect
        self.engine = connect_fn(self.cfg, out, self.weights, chunks, self.layout.is_data_owner)

    @property
    def pool(self):
        """This data owner's pool (the eval suites generate through it); None on other ranks."""
        return self.engine.pool if self.engine is not None else None

    # ------------------------------------------------------------------ the stage
    def batch(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """This rank's samples for ``step`` and the step's ``rollout/`` metrics. Data owners take the batch
        generated while the previous step trained, or read and collect one; a launched server that died is
        restarted and the batch collected again on the same paragraphs and seeds. Collective."""
        batch = None
        if self.layout.is_data_owner:
            batch = self._take(step) or self._read(step)
        while True:
            error = None
            if batch is not None and batch.samples is None:
                error = self._collect(batch)
            if not self.recover(error, f"step {step + 1}: rollout"):
                break
            if batch is not None:
                batch.reset()  # every data owner collects again after a restart
        samples, metrics = (batch.samples, batch.metrics) if batch is not None else (None, {})
        if self.cfg.rollout.max_staleness > 0 and samples is not None:
            metrics = {**metrics, **self._mark_staleness(samples)}
        return share_samples(samples), metrics

    def prefetch(self, step: int) -> None:
        """``rollout.max_staleness`` > 0: read ``step``'s paragraphs now and collect them in the background (data
        owners), while the current step trains on the current weights. Nothing after the last step, or on-policy."""
        if self.cfg.rollout.max_staleness > 0 and self.layout.is_data_owner and step < self.cfg.train.steps:
            self.prefetcher.submit(self._read(step), self._collect)

    def wait(self) -> dict[str, float]:
        """Wait for the batch in flight before the weight sync: it finishes on the weights it started with, so every
        batch comes from one weight version. Returns ``time/rollout_background`` (the batch's own wall time)."""
        batch = self.prefetcher.wait()
        return {"time/rollout_background": batch.seconds} if batch is not None and batch.seconds else {}

    def recover(self, error: RolloutError | None, where: str) -> bool:
        """After a stage's calls to the engine: True when a dead launched server was restarted at the current
        version and the stage should be retried (``Engine.recover``). Collective."""
        return self.engine.recover(error, where, self.weights.version)

    def metrics(self) -> dict[str, float]:
        """Counters of this process: restarts of launched servers (once there was one)."""
        restarts = self.engine.restarts if self.engine is not None else 0
        return {"rollout/engine_restarts": float(restarts)} if restarts else {}

    def close(self) -> None:
        """A batch still in flight (after an error) finishes or fails before the servers stop; the publisher's sync,
        which ``start`` attached, closes before them."""
        self.prefetcher.close()
        self.weights.close()
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ checkpoint part
    def state_dict(self) -> dict[str, Any]:
        """Collective: every DP rank's corpus position (``corpus``) and every data owner's finished batch in flight
        (``rollout_in_flight``, when there is one; its paragraphs are already counted in the corpus position)."""
        mine = (self.layout.dp_rank, self.corpus.state_dict()) if self.corpus is not None else None
        corpus = {str(r): s for item in gather_to_all(mine) if item is not None for r, s in [item]}
        self.prefetcher.wait()
        mine = (self.layout.dp_rank, self.prefetcher.state_dict()) if self.corpus is not None else None
        flight = {str(r): f for item in gather_to_all(mine) if item is not None for r, f in [item] if f is not None}
        return {"corpus": corpus, **({"rollout_in_flight": flight} if flight else {})}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        if self.corpus is None:
            return
        dp_rank = self.layout.dp_rank
        state = meta.get("corpus", {}).get(str(dp_rank))
        if state is None:
            raise ConfigError(f"checkpoint has no corpus position for DP rank {dp_rank} (saved with a different "
                              f"data-parallel size?); resume with the DP size it was saved with")
        self.corpus.load_state_dict(state)
        self.prefetcher.load_state_dict(meta.get("rollout_in_flight", {}).get(str(dp_rank)))

    # ------------------------------------------------------------------ mechanics
    def _read(self, step: int) -> Batch:
        """This data owner's paragraphs for ``step`` (advances the corpus)."""
        per_rank = self.cfg.train.paragraphs_per_step // self.layout.dp_size
        return Batch(step, [next(self.corpus) for _ in range(per_rank)])

    def _collect(self, batch: Batch) -> RolloutError | None:
        """Generate, score and weight ``batch`` (fills samples and ``rollout/``-prefixed metrics); returns the
        rollout failure instead of raising it. Safe on a background thread: HTTP to the servers, no collective."""
        tok = self.tokenizer
        ctx = StepContext(encode=tok.encode, decode=tok.decode, chat_template=self.chat_template, step=batch.step,
                          dp_rank=self.layout.dp_rank, eos_token_id=tok.eos_token_id)
        try:
            samples, metrics = collect(batch.paragraphs, self.cfg, self.engine.pool, ctx)
        except RolloutError as exc:
            return exc
        batch.samples, batch.metrics = samples, {f"rollout/{k}": v for k, v in metrics.items()}
        return None

    def _take(self, step: int) -> Batch | None:
        """The batch generated for ``step`` while the previous step trained (or restored from the checkpoint), once
        it is within ``rollout.max_staleness``; None when there is none. A batch whose background attempt failed,
        or that is older than the bound (a run resumed with a smaller ``max_staleness``), is collected again from
        its paragraphs with the current weights and the same seeds (logged)."""
        batch = self.prefetcher.take(step)
        if batch is None:
            return None
        version, bound = self.weights.version, self.cfg.rollout.max_staleness
        if batch.error is not None:
            logger.warning("step %d: the rollout generated during step %d failed (%s); generating it again",
                           step + 1, step, batch.error)
            batch.reset()
        elif batch.samples is not None and stalest(batch.samples, version) > bound:
            logger.warning("step %d: %d samples are %d weight versions old, over rollout.max_staleness=%d: "
                           "regenerating them with weight version %d", step + 1, len(batch.samples),
                           stalest(batch.samples, version), bound, version)
            self.stale_regenerated += len(batch.samples)
            batch.reset()
        return batch

    def _mark_staleness(self, samples: list[Sample]) -> dict[str, float]:
        """Each sample's staleness in its metadata (``hist/staleness``) and the step's staleness metrics."""
        version = self.weights.version
        for s in samples:
            k = staleness(s, version)
            if k is not None:
                s.metadata["staleness"] = k
        metrics = staleness_metrics(samples, version)
        metrics["rollout/stale_regenerated"] = float(self.stale_regenerated)  # so far in this process
        return metrics
