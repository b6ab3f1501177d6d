"""Run a GPTModel's output layer on a suffix of the sequence only: logits for positions ``start .. S-1``.

The output layer (``[H] -> [V / TP]``) is the largest matmul of a small model, and a GRPO step needs logits
only where a response token is predicted. ``logits_from(chunk, start)`` slices the output layer's input
``hidden_states[start:]`` (``[S, B, H]``, sequence-first) for the duration of one forward call, so the model
returns ``[B, S - start, V / TP]``. Positions before ``start`` get no logits and, in backward, a zero gradient:
exactly what they get from a loss that never reads their logits. Everything upstream of the output layer
(attention over the prompt included) is unchanged.

The slice is declined (full logits, ``start`` reported as 0) where the output layer's input is not the whole
sequence on this rank or is used more than once:

* sequence parallelism: ``hidden_states`` is split along S across the TP group and the output layer gathers it;
  a per-rank slice would cut the wrong positions;
* context parallelism: each CP rank holds two non-contiguous chunks of the sequence;
* multi-token prediction: the output layer runs once per MTP depth on shifted hidden states.

Only the config is read (never ranks); stages without an output layer (not the last pipeline stage) ignore it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _gpt_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def slicing_supported(config: Any) -> bool:
    """Whether the output layer's input is the whole local sequence, used once (see the module docstring)."""
    return (not getattr(config, "sequence_parallel", False)
            and (getattr(config, "context_parallel_size", 1) or 1) == 1
            and not getattr(config, "mtp_num_layers", None))


@contextlib.contextmanager
def logits_from(chunk: torch.nn.Module, start: int) -> Iterator[int]:
    """Within the block, ``chunk``'s forward computes logits for positions ``start ..`` only.

    Yields the start actually applied: ``start``, or 0 when the chunk has no output layer, ``start`` is 0, or the
    layout needs full logits (sequence/context parallelism, MTP). The caller indexes its labels with it.
    """
    model = _gpt_model(chunk)
    layer = getattr(model, "output_layer", None)
    if start <= 0 or layer is None or not getattr(model, "post_process", False) \
            or not slicing_supported(model.config):
        yield 0
        return
    calls = []

    def pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # [S, B, H]; a slice of the outer dim stays contiguous
        if start >= hidden.shape[0]:
            raise ValueError(f"logits_from: start {start} is not inside the sequence of length {hidden.shape[0]}")
        calls.append(hidden.shape[0])
        return (hidden[start:],) + tuple(args[1:])

    handle = layer.register_forward_pre_hook(pre_hook)
    try:
        yield start
    finally:
        handle.remove()
    if len(calls) > 1:
        raise RuntimeError(f"logits_from: the output layer ran {len(calls)} times in one forward; the slice "
                           f"assumes one call (an MTP or inference path the check above does not know)")
