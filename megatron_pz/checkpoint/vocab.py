"""The true vocabulary of a Megatron-LM checkpoint, which stores only the padded size.

Megatron-LM pads the tokenizer's vocabulary up to a multiple of ``make_vocab_size_divisible_by`` x TP and saves
that as ``args.padded_vocab_size``; the rows past the tokenizer are never real tokens. Every consumer (export,
training, the rollout engine, eval) needs the unpadded size, resolved here in one order:

1. an explicit size (``policy.vocab_size`` / ``convert --vocab-size``);
2. the saved ``args.vocab_size`` (Megatron-LM's ``--vocab-size``). With ``--tokenizer-type NullTokenizer``
   Megatron-LM adds an end-of-document id equal to it and pads ``vocab_size + 1``; that id belongs to no
   tokenizer (pretokenized data marks document ends with the tokenizer's own EOS), so it counts as padding;
3. the tokenizer's length: the one given (``policy.tokenizer`` / ``--tokenizer``) or the one the checkpoint
   carries or names (``args.tokenizer_model`` when it is a local path);
4. else an error naming ``policy.vocab_size``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_pz.errors import CheckpointError

logger = logging.getLogger(__name__)


def args_dict(args: Any) -> Mapping[str, Any]:
    """Megatron-LM's args (an argparse.Namespace, or a dict) as a mapping."""
    return args if isinstance(args, Mapping) else vars(args)


def named_tokenizer(args: Any) -> Path | None:
    """The tokenizer Megatron-LM's args name (``--tokenizer-model``), when it is a local file or folder.

    A Hub name (``HuggingFaceTokenizer`` accepts one) is not fetched: loading never touches the network.
    """
    model = args_dict(args).get("tokenizer_model")
    if not model:
        return None
    p = Path(str(model))
    return p if p.exists() else None


def true_vocab_size(args: Any, where: Path, *, explicit: int | None = None,
                    tokenizer_size: int | None = None, tokenizer_from: str = "the tokenizer") -> int:
    """The unpadded vocabulary of a checkpoint whose Megatron-LM ``args`` are given (see the module docstring).

    ``tokenizer_size``: len(tokenizer) of the tokenizer found for it (``tokenizer_from`` says which, for errors).
    """
    a = args_dict(args)
    padded = a.get("padded_vocab_size")
    if explicit is not None:
        size, source = int(explicit), "policy.vocab_size"
    elif a.get("vocab_size"):
        size, source = int(a["vocab_size"]), "the saved args.vocab_size"
    elif tokenizer_size is not None:
        size, source = int(tokenizer_size), tokenizer_from
    else:
        raise CheckpointError(
            f"{where}: the Megatron-LM checkpoint stores only the padded vocabulary ({padded}) and no tokenizer "
            f"was found (args.tokenizer_model={a.get('tokenizer_model')!r}); set policy.vocab_size (convert: "
            f"--vocab-size) to the tokenizer's size, or give the tokenizer (policy.tokenizer / --tokenizer)")
    if size <= 0:
        raise CheckpointError(f"{where}: vocabulary size from {source} must be positive, got {size}")
    if padded is not None:
        padded = int(padded)
        if size > padded:
            raise CheckpointError(f"{where}: {source} gives a vocabulary of {size}, larger than the checkpoint's "
                                  f"embedding ({padded} rows); is it the tokenizer this model was trained with?")
        multiple = int(a.get("make_vocab_size_divisible_by") or 128) * int(a.get("tensor_model_parallel_size") or 1)
        # NullTokenizer pads vocab_size + 1 (its end-of-document id), every other tokenizer its own length.
        if padded not in (math.ceil(size / multiple) * multiple, math.ceil((size + 1) / multiple) * multiple):
            logger.warning("%s: a vocabulary of %d (from %s) pads to %d, not to the checkpoint's %d rows "
                           "(make_vocab_size_divisible_by x TP = %d); check that this is the training tokenizer",
                           where, size, source, math.ceil(size / multiple) * multiple, padded, multiple)
    logger.info("%s: true vocabulary %d from %s (the checkpoint pads it to %s)", where, size, source, padded)
    return size
