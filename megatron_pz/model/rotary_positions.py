"""Rotary angles at given ``position_ids`` for one forward of a Megatron-Core ``GPTModel``.

``GPTModel._preprocess`` (Megatron-Core 0.16) computes RoPE from the sequence length only:
``rotary_pos_emb(S)`` returns the angles of positions ``0 .. S-1`` as ``[S, 1, 1, D]`` and every row uses them;
``position_ids`` reach only a learned absolute embedding, which these models do not have. Shared-prompt rows
(``trainer/shared_prompt.py``) restart positions for each response, so ``rotary_at(chunk, position_ids)``
re-indexes the angles by row: a forward hook on the model's ``RotaryEmbedding`` returns
``angles[position_ids.T]`` as ``[S, B, 1, D]``, which the unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``,
``t * cos + rotate_half(t) * sin`` over ``[S, B, H, D]``) broadcasts per row. The fused RoPE kernels expect
``[S, 1, 1, D]``: the provider turns ``apply_rope_fusion`` off for these layouts.

Every pipeline stage runs its own ``rotary_pos_emb`` and gets the same ``position_ids`` from the train step.
Context parallelism is refused (its angles are split across ranks before the hook could index them).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_pz.model.provider import unwrap


@contextlib.contextmanager
def rotary_at(chunk: torch.nn.Module, position_ids: torch.Tensor | None) -> Iterator[None]:
    """Within the block, ``chunk``'s RoPE angles are taken at ``position_ids`` ``[B, S]`` (None: unchanged)."""
    if position_ids is None:
        yield
        return
    model = unwrap(chunk)
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or getattr(model, "position_embedding_type", None) != "rope":
        raise ValueError(f"rotary_at: the model has no plain RoPE (position_embedding_type="
                         f"{getattr(model, 'position_embedding_type', None)!r})")
    if (getattr(model.config, "context_parallel_size", 1) or 1) > 1:
        raise ValueError("rotary_at: per-row rotary positions do not support context parallelism")
    pos = position_ids.t()  # [S, B]

    def hook(module: torch.nn.Module, args: tuple, angles: torch.Tensor) -> torch.Tensor:
        # angles: [S_rot, 1, 1, D] for positions 0 .. S_rot - 1 (S_rot = the full sequence, also under SP)
        if angles.dim() != 4 or angles.shape[1] != 1 or angles.shape[0] < pos.shape[0]:
            raise RuntimeError(f"rotary_at: unexpected angles {tuple(angles.shape)} for positions "
                               f"{tuple(pos.shape)}")
        return angles[:, 0, 0][pos].unsqueeze(2)  # [S, B, 1, D]

    handle = rope.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
