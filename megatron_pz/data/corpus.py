"""Stream ``{id, title, text}`` paragraphs from JSONL/Parquet shards: deterministic, DP-rank-strided, resumable.

Order of one epoch (fixed by ``seed`` and the epoch number alone):
  1. shards are the sorted list of files matched by ``CorpusConfig.paths``; with ``shuffle`` their order is
     permuted by ``Random(f"{seed}/{epoch}/shards")``;
  2. each shard is loaded whole (keep shards to a few hundred MB) and its records are permuted by
     ``Random(f"{seed}/{epoch}/{shard_index}")``;
  3. record number ``k`` of that epoch stream (counting every raw record, before any filter) belongs to DP rank
     ``k % dp_world_size``. Ranks therefore partition the corpus without communication, and a rank parses,
     validates and token-counts only its own records (so a malformed line is reported by the rank owning it).
  4. the rank's records are validated and filtered (bad records, length, forbidden substrings) and yielded.

``state_dict()`` after ``k`` paragraphs, loaded into a fresh reader with the same config, yields exactly what
an uninterrupted reader would have yielded from paragraph ``k + 1`` on.

Length filter [PZ §4.1: prompts are capped at 1536 tokens; method §6 item 2]: with ``n = count_tokens(text)``,
a paragraph is kept when ``n >= min_paragraph_tokens`` and ``paragraph_copies * n + prompt_overhead_tokens +
prompt_margin_tokens <= max_prompt_tokens`` (``paragraph_copies`` = 2 when the prompt restates part of the
paragraph, ``prompt.pred_restate``). Pass the tokenizer's counter and ``prompts.template_overhead_tokens(...)``; without a
counter a tokenizer-free over-estimate is used (``estimate_tokens``: UTF-8 bytes / 3).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_pz.data.shards import (Paragraph, estimate_tokens, load_shard, parse_record, resolve_shards,
                                     sample_corpus_path)
from megatron_pz.errors import CheckpointError, ConfigError, DataError

BAD_LINE_POLICIES = ("error", "skip")
__all__ = ["BAD_LINE_POLICIES", "CorpusConfig", "CorpusReader", "Paragraph"]


@dataclass
class CorpusConfig:
    """Where paragraphs come from and which are kept."""

    paths: list[str] = field(default_factory=list)
    """Shard files, directories (all ``*.jsonl``/``*.parquet`` inside) or glob patterns; [] = shipped sample (train)."""
    seed: int = 0
    """Seed of the per-epoch shard and record permutations."""
    shuffle: bool = True
    """Permute shards and records per epoch; False reads files in sorted order, records in file order."""
    num_epochs: int | None = None
    """Stop after this many passes; None = cycle forever (the trainer decides when to stop)."""
    min_paragraph_tokens: int = 16
    """Drop paragraphs with fewer tokens than this (INFERENCE: "very short paragraphs dropped")."""
    max_prompt_tokens: int = 1536
    """Drop paragraphs whose prompt would exceed this many tokens [PZ §4.1: max prompt 1536]."""
    prompt_margin_tokens: int = 8
    """Safety margin for tokens merged differently at the template/paragraph seams."""
    on_bad_line: str = "error"
    """Malformed record (non-JSON line, missing/empty ``text``): "error" raises DataError, "skip" counts it."""
    drop_if_contains: list[str] = field(default_factory=lambda: ["[mask]"])
    """Drop paragraphs containing any of these strings (the mask token would make masked prompts ambiguous); a run
    with a span objective adds ``span.mask_token`` when it is missing (``config.RunConfig.resolved``)."""

    def __post_init__(self) -> None:
        # Messages name the run-config key (the section is ``corpus``); bool is an int but never meant as a count.
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not isinstance(self.paths, (list, tuple)) or not all(isinstance(p, str) and p for p in self.paths):
            raise ConfigError(f"corpus.paths={self.paths!r}: expected a list of non-empty strings")
        if not _is_int(self.seed):
            raise ConfigError(f"corpus.seed={self.seed!r}: expected an int")
        if self.on_bad_line not in BAD_LINE_POLICIES:
            raise ConfigError(f"corpus.on_bad_line={self.on_bad_line!r}: expected one of {BAD_LINE_POLICIES}")
        if self.num_epochs is not None and (not _is_int(self.num_epochs) or self.num_epochs < 1):
            raise ConfigError(f"corpus.num_epochs={self.num_epochs!r}: expected null or an int >= 1")
        for name in ("min_paragraph_tokens", "max_prompt_tokens", "prompt_margin_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"corpus.{name}={value!r}: expected an int >= 0")
        if self.max_prompt_tokens <= self.min_paragraph_tokens:
            raise ConfigError(
                f"corpus.max_prompt_tokens={self.max_prompt_tokens} must exceed "
                f"corpus.min_paragraph_tokens={self.min_paragraph_tokens}"
            )
        # An empty string is in every text: it would drop the whole corpus.
        if not isinstance(self.drop_if_contains, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.drop_if_contains
        ):
            raise ConfigError(f"corpus.drop_if_contains={self.drop_if_contains!r}: expected a list of non-empty "
                              "strings")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CorpusReader:
    """Iterator over this DP rank's paragraphs; see the module docstring for order, filters and resume."""

    def __init__(
        self,
        cfg: CorpusConfig,
        *,
        count_tokens: Callable[[str], int] | None = None,
        prompt_overhead_tokens: int = 0,
        paragraph_copies: int = 1,
        dp_rank: int = 0,
        dp_world_size: int = 1,
    ) -> None:
        if not 0 <= dp_rank < dp_world_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size})")
        self.cfg = cfg
        self.count_tokens = count_tokens or estimate_tokens
        self.prompt_overhead_tokens = int(prompt_overhead_tokens)
        self.paragraph_copies = int(paragraph_copies)
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.shards = resolve_shards(cfg.paths or [str(sample_corpus_path("train"))])
        # Position: next raw record is record `pos` of the `shard_pos`-th shard of epoch `epoch`'s order;
        # `epoch_index` counts raw records of this epoch before it (decides the owning rank).
        self.epoch = self.shard_pos = self.pos = self.epoch_index = 0
        self.yielded_in_epoch = 0
        self.stats = {"yielded": 0, "bad": 0, "too_short": 0, "too_long": 0, "dropped_substring": 0}
        self._cache: tuple[int, int, list[tuple[int, Any]]] | None = None  # (epoch, shard_pos, records)
        self._order_cache: tuple[int, list[int]] | None = None  # (epoch, shard order)

    # ------------------------------------------------------------ order
    def _shard_order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = list(range(len(self.shards)))
            if self.cfg.shuffle:
                random.Random(f"{self.cfg.seed}/{epoch}/shards").shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _records(self) -> tuple[Path, list[tuple[int, Any]]]:
        shard_index = self._shard_order(self.epoch)[self.shard_pos]
        if self._cache is None or self._cache[:2] != (self.epoch, self.shard_pos):
            records = load_shard(self.shards[shard_index])
            if self.cfg.shuffle:
                random.Random(f"{self.cfg.seed}/{self.epoch}/{shard_index}").shuffle(records)
            self._cache = (self.epoch, self.shard_pos, records)
        return self.shards[shard_index], self._cache[2]

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> CorpusReader:
        return self

    def __next__(self) -> Paragraph:
        while True:
            if self.cfg.num_epochs is not None and self.epoch >= self.cfg.num_epochs:
                raise StopIteration
            if self.shard_pos >= len(self.shards):
                if self.yielded_in_epoch == 0 and self.cfg.num_epochs is None:  # cycling would never yield
                    raise DataError(
                        f"corpus {self.cfg.paths or 'sample'}: no paragraph survived the filters for "
                        f"dp_rank {self.dp_rank}/{self.dp_world_size} in epoch {self.epoch} (stats: {self.stats})"
                    )
                self.epoch, self.shard_pos, self.pos, self.epoch_index, self.yielded_in_epoch = (
                    self.epoch + 1, 0, 0, 0, 0,
                )
                continue
            path, records = self._records()
            if self.pos >= len(records):
                self.shard_pos, self.pos = self.shard_pos + 1, 0
                continue
            number, raw = records[self.pos]
            owner = self.epoch_index % self.dp_world_size
            self.pos += 1
            self.epoch_index += 1
            if owner != self.dp_rank:
                continue
            paragraph = self._accept(path, number, raw)
            if paragraph is not None:
                self.stats["yielded"] += 1
                self.yielded_in_epoch += 1
                return paragraph

    def _accept(self, path: Path, number: int, raw: Any) -> Paragraph | None:
        """Parse and filter one record of this rank; None when it is skipped (and counted)."""
        try:
            paragraph = parse_record(path, number, raw)
        except DataError:
            if self.cfg.on_bad_line == "error":
                raise
            self.stats["bad"] += 1
            return None
        if any(s in paragraph.text for s in self.cfg.drop_if_contains):
            self.stats["dropped_substring"] += 1
            return None
        n = self.count_tokens(paragraph.text)
        if n < self.cfg.min_paragraph_tokens:
            self.stats["too_short"] += 1
            return None
        if self.paragraph_copies * n + self.prompt_overhead_tokens + self.cfg.prompt_margin_tokens \
                > self.cfg.max_prompt_tokens:
            self.stats["too_long"] += 1
            return None
        return paragraph

    # ------------------------------------------------------------ resume
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "shards": [p.name for p in self.shards],
            "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python position + counters; JSON-serialisable."""
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "pos": self.pos,
            "epoch_index": self.epoch_index,
            "yielded_in_epoch": self.yielded_in_epoch,
            "stats": dict(self.stats),
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; raises CheckpointError if the corpus/config/rank differs."""
        try:
            saved = state["fingerprint"]
            position = {k: int(state[k]) for k in ("epoch", "shard_pos", "pos", "epoch_index", "yielded_in_epoch")}
            stats = dict(state["stats"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"corpus reader state: missing or malformed key ({exc!r})") from exc
        mine = self._fingerprint()
        for key, value in mine.items():
            if saved.get(key) != value:
                raise CheckpointError(
                    f"corpus reader state: '{key}' was {saved.get(key)!r} when saved but is {value!r} now"
                )
        for key, value in position.items():
            setattr(self, key, value)
        self.stats = {**self.stats, **stats}
        self._cache = None
