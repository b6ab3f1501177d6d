"""``megatron-pz convert``: HF safetensors <-> Megatron torch_dist checkpoints."""
from __future__ import annotations

import argparse
import time

from megatron_pz.dtypes import SHORT_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert HF safetensors <-> Megatron torch_dist checkpoints",
                       description="Convert between an HF model folder and a Megatron checkpoint root "
                                   "(latest_checkpointed_iteration.txt + iter_NNNNNNN/, torch_dist).")
    p.add_argument("--from", dest="src_format", choices=["hf", "mcore"], required=True)
    p.add_argument("--to", dest="dst_format", choices=["hf", "mcore"], required=True)
    p.add_argument("src", help="source folder (HF model folder, or Megatron checkpoint root / iter folder)")
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
    if (args.src_format, args.dst_format) == ("hf", "mcore"):
        hf_to_mcore(args.src, args.dst, tp=args.tp, pp=args.pp, dtype=args.dtype, ep=args.ep)
    elif (args.src_format, args.dst_format) == ("mcore", "hf"):
        mcore_to_hf(args.src, args.dst, dtype=args.dtype, vocab_size=args.vocab_size,
                    allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                    rope_linear_factor=args.rope_linear_factor)
    else:
        raise UserError(f"nothing to do: --from {args.src_format} --to {args.dst_format}")
    print(f"converted {args.src} -> {args.dst} in {time.perf_counter() - t0:.1f}s")
    return 0
