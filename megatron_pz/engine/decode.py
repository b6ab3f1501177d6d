"""A KV cache written in place: the decode step of ``generation.generate_rows`` without transformers' per-step copy.

transformers' ``DynamicCache`` appends each step's keys and values with ``torch.cat``, so step t copies the whole
cache of every layer: for SmolLM2-135M, 16 rows x ~230 positions, that is 30 layers x 2 x (16, 3, 230, 64) fp32
= 170 MB written per token, 38 % of a decode step's CPU time (profile in docs/performance.md, change 7). Here
each layer owns buffers sized for the whole call (prompt + ``max_new_tokens``) and a step writes one column into
them; attention reads a view of the filled columns.

The keys and values the model sees are the same numbers at the same positions, with the same shapes, as with
``DynamicCache`` (the view only has a longer row stride), so logits, sampled tokens and log-probs are unchanged:
``tests/unit/test_decode_cache.py`` compares the two token for token. Only plain full-attention layers
(``DynamicLayer``) are replaced; sliding-window and linear-attention layers keep their own class.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers of ``capacity`` positions, filled left to right.

    ``keys`` / ``values`` (what ``DynamicLayer``'s readers use) are always views ``buffer[:, :, :length]``:
    (B, H_kv, length, D) of the (B, H_kv, capacity, D) buffers.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0
        self._k: torch.Tensor | None = None  # (B, H_kv, capacity, D)
        self._v: torch.Tensor | None = None  # (B, H_kv, capacity, D_v)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, d))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.length = 0
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``key_states`` / ``value_states`` (B, H_kv, q, D) at columns [length, length + q); return the
        (B, H_kv, length + q, D) views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions cannot take position {end - 1}: the caller "
                               f"sized it below prompt + max_new_tokens")
        self._k[:, :, self.length:end].copy_(key_states)
        self._v[:, :, self.length:end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a non-positive count, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        self.keys = self.values = None
        self.is_initialized = False

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Rows ``indices`` (B',) of the cache: new (B', H_kv, capacity, D) buffers, the filled columns copied."""
        if not self.is_initialized:
            return
        k = self._k.new_empty((len(indices), *self._k.shape[1:]))
        v = self._v.new_empty((len(indices), *self._v.shape[1:]))
        k[:, :, :self.length] = self._k[indices, :, :self.length]
        v[:, :, :self.length] = self._v[indices, :, :self.length]
        self._k, self._v = k, v
        self._views()


def preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """An empty ``DynamicCache`` for ``config`` whose full-attention layers hold ``capacity`` positions in place.

    ``capacity``: the longest sequence of the call, padded prompt length + max_new_tokens. ``generate`` takes it
    as a user cache (``cache=`` / ``past_key_values=``) and fills it as it would its own."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
