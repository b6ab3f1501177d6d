"""``megatron-pz convert``: HF safetensors <-> Megatron torch_dist checkpoints."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from megatron_pz.dtypes import SHORT_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert HF safetensors <-> Megatron torch_dist checkpoints",
                       description="Convert between an HF model folder and a Megatron checkpoint root "
                                   "(latest_checkpointed_iteration.txt + iter_NNNNNNN/, torch_dist).")
    p.add_argument("--from", dest="src_format", choices=["hf", "mcore"], required=True)
    p.add_argument("--to", dest="dst_format", choices=["hf", "mcore"], required=True)
    p.add_argument("src", help="source: an HF model folder (--from hf), a Megatron checkpoint root / iter folder or a "
                               "training run's folder (--from mcore), or 'smollm2' (either)")
    p.add_argument("dst", help="destination folder (written atomically)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the saved Megatron checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the saved Megatron checkpoint")
    p.add_argument("--ep", type=int, default=1,
                   help="expert parallel size of the saved Megatron checkpoint (MoE models only)")
    p.add_argument("--dtype", choices=SHORT_NAMES, default=None,
                   help="parameter dtype (default: that of the source weights)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="true vocabulary size when exporting a Megatron-LM checkpoint (it stores only the "
                        "padded size); default: the saved args.vocab_size, else the tokenizer's length")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (HF folder or SentencePiece .model) of a Megatron-LM checkpoint, for its true "
                        "vocabulary and copied into the export; default: the one the checkpoint carries or names")
    p.add_argument("--rope-linear-factor", type=float, default=None,
                   help="export a config.json that runs the model at this many times its context with linear "
                        "position interpolation (rope_scaling linear), as policy.rope_scaling does in training")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading common.pt with pickle if it holds non-allow-listed objects "
                        "(only for checkpoints you trust)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_pz.convert.api import hf_to_mcore, mcore_to_hf
    from megatron_pz.errors import UserError

    t0 = time.perf_counter()
    src = source_path(args.src, args.src_format)
    if (args.src_format, args.dst_format) == ("hf", "mcore"):
        hf_to_mcore(src, args.dst, tp=args.tp, pp=args.pp, dtype=args.dtype, ep=args.ep)
    elif (args.src_format, args.dst_format) == ("mcore", "hf"):
        mcore_to_hf(src, args.dst, dtype=args.dtype, vocab_size=args.vocab_size,
                    allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                    rope_linear_factor=args.rope_linear_factor)
    else:
        raise UserError(f"nothing to do: --from {args.src_format} --to {args.dst_format}")
    print(f"converted {args.src} -> {args.dst} in {time.perf_counter() - t0:.1f}s")
    return 0


def source_path(src: str, fmt: str) -> str:
    """SRC as the model sources every command takes (``convert.source``): 'smollm2' is its HF folder, or with
    ``--from mcore`` its Megatron copy; a training run's folder is its ``checkpoints/``. Any other path is given
    to the converter as it is, which names what it lacks."""
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.convert.source import SMOLLM2, resolve_source

    if src == SMOLLM2:
        if fmt == "mcore":
            return str(resolve_source(src, what="SRC").path)
        from megatron_pz.convert.smollm2 import prepare_smollm2

        return str(prepare_smollm2(megatron=False)[0])
    path = Path(src)
    run_checkpoints = path / ckpt.RUN_CHECKPOINT_DIR
    if fmt == "mcore" and path.is_dir() and not ckpt.is_megatron_checkpoint(path) and \
            ckpt.is_megatron_checkpoint(run_checkpoints):
        return str(run_checkpoints)
    return src
