"""Megatron checkpoint -> self-contained HF folder (weights + config + tokenizer + generation config).

``convert.api.mcore_to_hf`` copies the tokenizer files only from ``<checkpoint root>/hf_tokenizer`` (what
``megatron-pz convert --to mcore`` writes). A *training run's* ``checkpoints/`` has no such folder: the trainer
keeps the tokenizer and generation config in the run's ``hf_meta/`` (``trainer.setup._write_hf_meta``), a sibling
of ``checkpoints/``. ``export_hf`` adds that fallback, so the result loads with both
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` (lm-evaluation-harness, vLLM, ...).

    python -m megatron_pz.convert.export RUN/checkpoints OUT [--dtype bf16] [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from megatron_pz.convert.source import ModelSource, tokenizer_dir
from megatron_pz.dtypes import SHORT_NAMES
from megatron_pz.errors import CheckpointError, UserError
from megatron_pz.model.tokenizer import has_tokenizer_files


def copy_tokenizer(src_dir: str | Path, dst: str | Path) -> list[str]:
    """Copy the non-weight HF files of ``src_dir`` (tokenizer, generation_config, chat template) into ``dst``,
    never overwriting ``config.json`` or weights; returns the names copied."""
    from megatron_pz.convert.hf_io import aux_files

    dst = Path(dst)
    copied = []
    for f in aux_files(src_dir):
        if not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def export_hf(src: str | Path, dst: str | Path, dtype: str | None = None, tokenizer: str | Path | None = None) -> Path:
    """``mcore_to_hf`` plus the tokenizer files (from ``tokenizer`` or ``model.source.tokenizer_dir``)."""
    from megatron_pz.convert.api import mcore_to_hf

    tok_dir = tokenizer_dir(ModelSource(kind="mcore", path=Path(src)), tokenizer)
    if tok_dir is None or not has_tokenizer_files(tok_dir):
        raise CheckpointError(f"no HF tokenizer found for checkpoint {src} (looked in <root>/hf_tokenizer and the "
                              f"run's hf_meta/); pass --tokenizer DIR")
    mcore_to_hf(src, dst, dtype=dtype, tokenizer=tok_dir)  # its length is the true vocabulary
    copy_tokenizer(tok_dir, dst)
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_pz.convert.export", description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=list(SHORT_NAMES), default=None)
    p.add_argument("--tokenizer", default=None)
    args = p.parse_args(argv)
    try:
        export_hf(args.src, args.dst, dtype=args.dtype, tokenizer=args.tokenizer)
    except UserError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
