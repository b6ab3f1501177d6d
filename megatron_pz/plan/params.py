"""Parameters one rank holds: per decoder layer and per pipeline stage, dense and expert apart.

Counts follow Megatron-Core's sharding: attention and MLP weights split over TP, experts over EP x ETP,
norms and the MoE router replicated, the vocabulary padded (``padded_vocab``) and split over TP.
MoE fields of a ``ModelArch`` are optional and read with ``getattr`` (``moe_dims``).
"""
from __future__ import annotations

import math
from typing import Any

from megatron_pz.plan.layout import Layout


def moe_dims(arch: Any) -> tuple[int, int, int] | None:
    """(num_experts, expert ffn width, top-k) or None for dense models (MoE fields are optional)."""
    experts = getattr(arch, "num_experts", None)
    if not experts:
        return None
    return int(experts), int(getattr(arch, "moe_ffn_hidden_size", None) or arch.ffn_hidden_size), \
        int(getattr(arch, "moe_router_topk", None) or 1)


def padded_vocab(arch: Any, tp: int) -> int:
    """Megatron-LM's rule: vocab rounded up to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = int(getattr(arch, "make_vocab_size_divisible_by", 128)) * tp
    return int(math.ceil(arch.vocab_size / multiple) * multiple)


def layer_param_counts(arch: Any, tp: int = 1, ep: int = 1, etp: int | None = None) -> tuple[int, int]:
    """(dense, expert) parameters of one decoder layer held by one rank."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attn = (h * (q + 2 * kv) + q * h + (q + 2 * kv if arch.qkv_bias else 0)) // tp
    attn += 2 * d if arch.qk_norm else 0  # q/k RMSNorm weights, replicated
    norms = 2 * h  # input and pre-MLP RMSNorm, replicated
    moe = moe_dims(arch)
    if moe is None:
        return attn + norms + 3 * h * arch.ffn_hidden_size // tp, 0
    experts, f_e, _ = moe
    router = experts * h  # replicated on every rank
    expert = (experts // ep) * 3 * h * f_e // (etp or tp)
    return attn + norms + router, expert


def stage_param_counts(arch: Any, layout: Layout, stage: int) -> tuple[int, int]:
    """(dense, expert) parameters one rank of pipeline ``stage`` holds."""
    pp, tp = layout.pp, layout.tp
    dense, expert = layer_param_counts(arch, tp, layout.ep, layout.expert_tp)
    layers = arch.num_layers // pp
    dense, expert = dense * layers, expert * layers
    emb = padded_vocab(arch, tp) * arch.hidden_size // tp
    if stage == 0:
        dense += emb  # word embeddings
    if stage == pp - 1:
        dense += arch.hidden_size  # final norm
        # Output layer; with tied embeddings and PP > 1 the last stage keeps its own copy of the embedding.
        if not arch.tie_word_embeddings or pp > 1:
            dense += emb
    return dense, expert
