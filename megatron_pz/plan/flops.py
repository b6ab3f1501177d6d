"""Model FLOPs of a training step, and the datasheet peak of known GPUs (for MFU).

FLOPs: 6 * N_matmul per token (forward 2N, backward 4N) + 12 * L * s * q per token for attention scores and
values (PaLM, Chowdhery et al. 2022, App. B; the full s x s matrix, no causal halving, as Megatron-LM and
PaLM count it). N_matmul counts the weights of every matmul a token passes through, including the output
layer (logits) but not the embedding lookup; MoE counts the top-k experts and the router. Recomputation is
not counted (model FLOPs, not hardware FLOPs), so MFU is comparable across recompute settings.
``microbatch_flops`` counts a micro-batch as laid out instead, attention over the (query, key) pairs it is given
(the trainer's: those the rows' masks allow, ``train_flops.py``).
"""
from __future__ import annotations

from typing import Any

from megatron_pz.plan.params import moe_dims

# Dense peak TFLOP/s per device for 16-bit matmuls (vendor data sheets, dense, no sparsity).
PEAK_TFLOPS_16BIT = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0, "GH200": 989.4}


def matmul_params(arch: Any) -> int:
    """Weights of the matmuls one token passes through (active experts only, output layer included)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    moe = moe_dims(arch)
    mlp = 3 * h * arch.ffn_hidden_size if moe is None else moe[2] * 3 * h * moe[1] + moe[0] * h
    return arch.num_layers * (h * (q + 2 * kv) + q * h + mlp) + arch.vocab_size * h


def model_flops_per_token(arch: Any, seq_length: int) -> float:
    """Training FLOPs per token: 6 N_matmul + 12 L s q (see the module docstring)."""
    q = arch.num_attention_heads * arch.head_dim
    return 6.0 * matmul_params(arch) + 12.0 * arch.num_layers * seq_length * q


def microbatch_flops(arch: Any, rows: int, seq_length: int, logit_positions: int | None = None,
                     attention_pairs: int | None = None) -> float:
    """Training (forward + backward = 3 x forward) matmul FLOPs of one micro-batch of ``rows`` x ``seq_length``.

    Unlike ``model_flops_per_token`` it counts the layout the trainer really runs: every row position through the
    layers (padding and shared prompts as laid out), attention over ``attention_pairs`` (query, key) pairs per
    layer and head (summed over rows; None = the full ``S x S`` per row), and the output layer on
    ``logit_positions`` per row only (``model/logit_window.py``; None = all ``seq_length``). With shared-prompt
    rows (``trainer/shared_prompt.py``) a group's prompt counts once per micro-batch, the saving
    ``benchmarks/shared_prompt.py`` predicts from. ``train_flops`` passes the pairs the rows' masks allow
    (``RowLayout.useful_pairs``: causal triangles, a response's prompt block and its own triangle, no padding).
    """
    h, d = arch.hidden_size, arch.head_dim
    q = arch.num_attention_heads * d
    layer_params = (matmul_params(arch) - arch.vocab_size * h) // arch.num_layers
    tokens = rows * seq_length
    pairs = rows * seq_length * seq_length if attention_pairs is None else attention_pairs
    layers = arch.num_layers * (2 * tokens * layer_params + 4 * pairs * q)
    logits = 2 * rows * (seq_length if logit_positions is None else logit_positions) * h * arch.vocab_size
    return 3.0 * (layers + logits)


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense 16-bit peak of a known GPU (by name, e.g. 'NVIDIA H100 80GB HBM3'); None when unknown or fp32."""
    if dtype not in ("bf16", "fp16"):
        return None
    name = device_name.upper()
    for key in sorted(PEAK_TFLOPS_16BIT, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS_16BIT[key]
    return None
