"""Every input a run reads, checked before any process group, model or rollout server exists.

A wrong path otherwise surfaces minutes later (after Megatron has built the model, or on the first corpus read
of step 1) as a loader's error that names a file but not the setting to change. Each check here fails with one
line naming the config key to set (``policy.load``, ``policy.tokenizer``, ``corpus.paths``, ``eval.data.<suite>``,
``output_dir``) and the file at fault. The checks stat files and read a few bytes, without communication: the
checkpoint's metadata on every rank, the first record of each corpus shard on rank 0.

Not here: checks that need the model's architecture, which is read from ``policy.load`` once this has passed
(the prompt + response length against the context window is ``setup.validate_lengths``, called before the model
is built), and ``policy.load=smollm2``, which the resolver converts on first use and checks itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_pz import checkpoint as ckpt
from megatron_pz import mcore_compat
from megatron_pz.config import PolicyConfig, RunConfig
from megatron_pz.convert.hf_io import HFCheckpoint
from megatron_pz.model.provider import use_transformer_engine
from megatron_pz.convert.source import (
    SMOLLM2,
    ModelSource,
    resolve_source,
    tokenizer_dir,
)
from megatron_pz.data.corpus import CorpusConfig
from megatron_pz.data.shards import parse_record, resolve_shards, sample_corpus_path
from megatron_pz.errors import CheckpointError, ConfigError, DataError
from megatron_pz.eval.runner import EvalConfig

# The files model.tokenizer.load_tokenizer reads from a folder (HF fast/slow, SentencePiece).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
TOKENIZER_HINT = ("set policy.tokenizer (--tokenizer) to an HF tokenizer folder (tokenizer.json or "
                  "tokenizer_config.json) or a SentencePiece .model file")


def preflight(cfg: RunConfig, rank: int | None = None) -> None:
    """Raise a ConfigError / CheckpointError / DataError naming the key to set for the first bad input.

    ``rank`` (default: torchrun's RANK, 0 alone): the corpus and eval files are checked by rank 0 only, so that a
    corpus of thousands of shards is not opened by every rank of a large job at once; its failure stops the job.
    The checkpoint checks are a few stat calls and run everywhere."""
    check_parallel(cfg)
    source = check_policy(cfg.policy)
    check_tokenizer(cfg.policy, source)
    check_resume(cfg)
    if (int(os.environ.get("RANK", "0")) if rank is None else rank) == 0:
        check_corpus(cfg.corpus)
        check_eval_data(cfg.eval)
        check_wandb(cfg.logging.wandb)


def check_parallel(cfg: RunConfig) -> None:
    """Context parallelism is refused until the train step splits micro-batches over the CP ranks
    (``trainer/context_parallel.py`` holds the layout): every CP rank would otherwise train on the whole
    sequence. Without Transformer Engine it could not run at all (Megatron-Core's local attention has no CP)."""
    cp = cfg.parallel.context_parallel_size
    if cp == 1:
        return
    if not use_transformer_engine(cfg.model):
        raise ConfigError(f"parallel.context_parallel_size={cp} needs Transformer Engine (a CUDA node): Megatron-"
                          f"Core's local attention does not split a sequence over context-parallel ranks; set "
                          f"parallel.context_parallel_size=1")
    raise ConfigError(f"parallel.context_parallel_size={cp} is not supported yet: the train step does not split "
                      f"its micro-batches over the CP ranks (each would train on the whole sequence); set "
                      f"parallel.context_parallel_size=1 and use tensor or pipeline parallelism for long sequences")


def check_wandb(enabled: bool) -> None:
    """``logging.wandb`` needs the wandb package (rank 0 logs); say so before minutes of set-up, not after."""
    if enabled:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb=true needs the wandb package: pip install wandb "
                              "(or set logging.wandb=false)")


# ------------------------------------------------------------------ weights
def check_policy(policy: PolicyConfig) -> ModelSource | None:
    """``policy.load`` names a readable checkpoint: Megatron layout whole, or an HF folder with its weights.
    None for smollm2 (resolved, and converted on first use, by setup)."""
    if policy.load == SMOLLM2:
        return None
    source = resolve_source(policy.load, what="policy.load")  # names policy.load when it is neither layout
    try:
        if source.kind == "mcore":
            check_megatron_checkpoint(source.path)
        else:
            _check_hf_folder(source.path)
    except (CheckpointError, ConfigError) as exc:
        raise CheckpointError(f"policy.load={policy.load!r}: {exc}") from None
    return source


def check_megatron_checkpoint(path: Path) -> ckpt.CheckpointInfo:
    """Tracker -> iteration folder -> torch_dist metadata -> every shard file whole, and an architecture to read
    (our megatron_pz.json, or Megatron-LM's args in the common state: common.pt, or inside the .distcp files
    as Megatron-Core 0.17+ writes it)."""
    info = ckpt.resolve(path)
    if "arch" not in info.meta and not mcore_compat.has_common_state(info.iter_dir):
        raise CheckpointError(f"{info.iter_dir} has neither {ckpt.META} nor common.pt: cannot tell the "
                              f"architecture (a torch_dist checkpoint saved by Megatron-LM or megatron-pz?)")
    ckpt.validate_files(info.iter_dir)
    return info


def _check_hf_folder(path: Path) -> None:
    config = path / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config} is not a readable JSON file ({exc})") from None
    HFCheckpoint(path)  # finds the weight files and their shard index; names the missing one


def check_resume(cfg: RunConfig) -> None:
    """The run's own checkpoints, which the same command resumes from, are whole (or resuming is off)."""
    root = Path(cfg.output_dir) / ckpt.RUN_CHECKPOINT_DIR
    if not cfg.checkpoint.auto_resume or not (root / ckpt.TRACKER).exists():
        return
    try:
        check_megatron_checkpoint(root)
    except CheckpointError as exc:
        raise CheckpointError(f"output_dir={cfg.output_dir!r} holds a checkpoint to resume from, but {exc}; "
                              f"set output_dir to a new folder or checkpoint.auto_resume=false to start "
                              f"fresh") from None


# ------------------------------------------------------------------ tokenizer
def check_tokenizer(policy: PolicyConfig, source: ModelSource | None) -> None:
    """``policy.tokenizer``, or the tokenizer that travels with ``policy.load``, is there to be loaded."""
    if policy.tokenizer:
        path = Path(policy.tokenizer)
        if not path.exists():
            raise ConfigError(f"policy.tokenizer={policy.tokenizer!r}: no such file or directory")
        if path.is_file() and path.suffix != ".model":
            raise ConfigError(f"policy.tokenizer={policy.tokenizer!r} is a file but not a SentencePiece .model; "
                              f"{TOKENIZER_HINT}")
        if path.is_dir() and not _holds_tokenizer(path):
            raise ConfigError(f"policy.tokenizer={policy.tokenizer!r} holds none of {', '.join(TOKENIZER_MARKERS)} "
                              f"(nor {ckpt.HF_AUX_DIR}/); {TOKENIZER_HINT}")
        return
    if source is None:  # smollm2 ships its tokenizer
        return
    found = tokenizer_dir(source) or source.path  # setup's rule
    if not _holds_tokenizer(found):
        what = "a Megatron checkpoint" if source.kind == "mcore" else "an HF model folder"
        raise ConfigError(f"policy.load={str(source.path)!r} is {what} without a tokenizer (looked for "
                          f"{ckpt.HF_AUX_DIR}/ next to it and {ckpt.RUN_HF_META_DIR}/ of its run); {TOKENIZER_HINT}")


def _holds_tokenizer(folder: Path) -> bool:
    return any((d / f).is_file() for d in (folder, folder / ckpt.HF_AUX_DIR) for f in TOKENIZER_MARKERS)


# ------------------------------------------------------------------ data
def check_corpus(corpus: CorpusConfig) -> None:
    """Each path matches shard files, and the first record of each shard is a valid paragraph.

    With ``corpus.on_bad_line=skip`` a bad first record is allowed (the reader counts and skips it), but a shard
    must still open; a corpus of only empty shards is refused either way."""
    if not corpus.paths:
        try:
            sample_corpus_path("train")
        except (ConfigError, DataError) as exc:
            raise DataError(f"corpus.paths is empty, so the shipped sample is used, but {exc}") from None
        return
    try:
        shards = resolve_shards(corpus.paths)
    except DataError as exc:
        raise DataError(f"corpus.paths: {exc}") from None
    empty = 0
    for shard in shards:
        try:
            first = load_first_record(shard)
            if first is not None and corpus.on_bad_line == "error":
                parse_record(shard, *first)
        except DataError as exc:
            hint = "" if corpus.on_bad_line == "skip" else "; or set corpus.on_bad_line=skip to skip such records"
            raise DataError(f"corpus.paths: {exc}{hint}") from None
        empty += first is None
    if empty == len(shards):
        raise DataError(f"corpus.paths={corpus.paths!r}: all {len(shards)} shard file(s) are empty")


def load_first_record(path: Path) -> tuple[int, Any] | None:
    """``(line_or_row_number, raw)`` of a shard's first record, as ``data.shards.load_shard`` gives it, reading
    only that record (shards are loaded whole later, one at a time); None for an empty shard."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        return number, raw.decode("utf-8")
                    except UnicodeDecodeError:
                        return number, raw
        return None
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(path)
        names = shard.schema_arrow.names
        batch = next(shard.iter_batches(batch_size=1), None)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({exc})") from None
    if "text" not in names:
        raise DataError(f"{path}: Parquet file has no 'text' column (columns: {names})")
    return (1, batch.to_pylist()[0]) if batch is not None and batch.num_rows else None


def check_eval_data(ev: EvalConfig) -> None:
    """The data files named for the suites this run evaluates exist (unused when ``eval.interval`` is 0)."""
    if ev.interval <= 0:
        return
    for suite in ev.suites:
        path = ev.data.get(suite)
        if path is not None and not Path(path).exists():
            raise DataError(f"eval.data.{suite}={path!r}: no such file or directory")
    if ev.harness:  # lm-eval installed, the folders there, every task name known (before the first step)
        from megatron_pz.eval.harness import task_manager

        task_manager(ev.harness, ev.harness_include, flag="eval.harness_include")
