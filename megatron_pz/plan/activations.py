"""Bytes autograd keeps for backward on one rank: per layer, per pipeline stage, and the loss's logits.

Activation accounting. Korthikanti's per-layer figure for one micro-batch of b sequences of s tokens, hidden
h, a heads, 16-bit activations, dropout, a 4h GELU MLP and multi-head attention is s*b*h*(34 + 5*a*s/h) bytes
without parallelism; with TP t and sequence parallelism it is divided by t; without sequence parallelism
s*b*h*(10 + 24/t + 5*a*s/(h*t)). Selective recomputation (of the core attention) removes the 5*a*s/h term;
full recomputation keeps only the layer input, 2*s*b*h (/t with SP). ``layer_activation_bytes`` computes
the same terms from the real widths, so that it reduces to those formulas under the paper's assumptions
(tests check it) and covers the models we train:

  per token, in units of the activation dtype (e bytes):
    2h        the two norm inputs                                           (/t only with SP)
    h + h     the QKV and MLP input (norm outputs)                          (/t only with SP)
    q + k     q/k RMSNorm inputs (Qwen3 qk_norm)                            (/t)
    q + 2kv   core attention inputs Q, K, V; kv = q when unfused            (/t)
              (Megatron's local attention repeats K and V to every head)
    q         output projection input                                       (/t)
    W1 + W2   MLP: activation input and fc2 input. GELU: 4h + 4h. SwiGLU    (/t)
              fused: 2f + f; unfused (CPU): 2f + f + f (silu output kept)
  per score (a * s * s_kv per micro-batch, unfused attention only):
    softmax output; fp32 softmax of 16-bit activations keeps a 16-bit copy too
  dropout (off in RL: our TransformerConfig sets it to 0) adds 1-byte masks and the dropped copies.
  Flash attention (Transformer Engine) keeps no scores: the a*s^2 term vanishes.
  MoE (balanced routing): router input h, then per routed copy (top-k): permuted input h, 2f_e + f_e, and
  the expert output h before the weighted combine.

Not modelled: pipeline p2p buffers, the embedding's own activation, kernel workspaces, CPU/GPU copies of
checkpoints, and the fragmentation the fixed overhead stands for.
"""
from __future__ import annotations

from typing import Any

from megatron_pz import dtypes
from megatron_pz.plan.layout import Layout, Workload
from megatron_pz.plan.params import moe_dims, padded_vocab

# Bytes per logit element alive at the peak of the loss on the last stage (trainer/step.py -> logprobs.py):
# the model-dtype logits (dropped when already fp32: .float() is then a no-op) + fp32 scaled logits (4)
# + the clone vocab_parallel_cross_entropy turns into the softmax it saves for backward (4) + token_entropy's
# temporaries, all fp32 (logits - max, exp, nan_to_num, their product: 16). + 4 on the TP rank that holds
# padded vocab rows (masked_fill copies). token_entropy now works in row chunks, which removes the 16 B of
# entropy temporaries; the constant still counts them (conservative) until the CPU sweep and the tables in
# docs/scaling.md are re-measured with the chunked version.
LOGIT_BYTES_FP32_LOSS = 4 + 4 + 16
LOGIT_BYTES_PADDED_VOCAB = 4


def layer_activation_bytes(s: int, b: int, h: int, heads: int, q: int, kv: int, w1: int, w2: int, e: int,
                           tp: int = 1, sp: bool = False, recompute: str | None = None, flash: bool = True,
                           dropout: bool = False, softmax_fp32: bool = False, qk_norm: bool = False,
                           s_kv: int | None = None) -> float:
    """Bytes one transformer layer keeps for backward, for one micro-batch on one TP rank.

    ``s``: tokens of this rank's sequence chunk (s / CP); ``s_kv``: keys each query attends (default s).
    ``q``, ``kv``: query and key/value widths; ``w1``/``w2``: MLP activation-input and fc2-input widths
    (GELU 4h/4h, SwiGLU 2f/f, or the MoE per-token equivalents); ``e``: activation bytes.
    With recompute="full" this is the checkpointed layer input only (see ``stage_activation_bytes``).
    """
    t = tp
    rep = t if sp else 1  # replicated across TP ranks unless sequence parallelism shards them
    if recompute == "full":
        return e * s * b * h / rep
    s_kv = s if s_kv is None else s_kv
    tokens = s * b
    kv_core = kv if flash else q
    replicated = e * 4 * h  # two norm inputs + QKV input + MLP input
    split = e * ((q + kv if qk_norm else 0) + q + 2 * kv_core + q + w1 + w2)
    masks = 2 * h if dropout else 0  # 1-byte masks after attention and MLP
    total = tokens * ((replicated + masks) / rep + split / t)
    if not flash and recompute != "selective":
        softmax = (4 + (e if e != 4 else 0)) if softmax_fp32 else e
        per_score = softmax + ((1 + e) if dropout else 0)  # dropout: mask + dropped copy
        total += heads * s * s_kv * b * per_score / t
    return total


def moe_activation_bytes(tokens: float, h: int, f_e: int, k: int, e: int, etp: int = 1, fused: bool = True) -> float:
    """Bytes an MoE MLP keeps on one rank for ``tokens`` local tokens (balanced routing, top-``k``).

    Per routed copy: the permuted input and the expert output before the weighted combine (h each; the
    tokens of the expert-TP group are gathered, x ETP) and SwiGLU's 2f_e + f_e (+ f_e unfused; ETP splits
    the widths and gathers the tokens, so these do not change with ETP).
    """
    return e * tokens * k * (2 * h * etp + 3 * f_e + (0 if fused else f_e))


def stage_activation_bytes(arch: Any, layout: Layout, workload: Workload, stage: int) -> float:
    """Activations a rank of pipeline ``stage`` holds at its peak (1F1B: stage i keeps min(PP - i, m))."""
    e = dtypes.nbytes(workload.dtype)
    s = workload.seq_length // layout.cp
    b = workload.micro_batch_size
    h, tp = arch.hidden_size, layout.tp
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    moe = moe_dims(arch)
    if moe is None:
        f = arch.ffn_hidden_size
        w1, w2 = 2 * f + (0 if workload.fused_swiglu else f), f
    else:
        w1 = w2 = 0
    kw = dict(s=s, b=b, h=h, heads=arch.num_attention_heads, q=q, kv=kv, w1=w1, w2=w2, e=e, tp=tp,
              sp=layout.sequence_parallel, flash=workload.flash_attention, dropout=workload.dropout,
              softmax_fp32=workload.softmax_fp32, qk_norm=arch.qk_norm,
              s_kv=workload.score_keys or workload.seq_length)

    def layer(recompute: str | None) -> float:
        out = layer_activation_bytes(recompute=recompute, **kw)
        if moe is not None and recompute != "full":
            tokens = s * b / (tp if layout.sequence_parallel else 1)
            out += moe_activation_bytes(tokens, h, moe[1], moe[2], e, layout.expert_tp, workload.fused_swiglu)
        return out

    layers = arch.num_layers // layout.pp
    m = workload.num_microbatches or layout.pp
    total = min(layout.pp - stage, m) * layers * layer(workload.recompute)
    if workload.recompute == "full":
        total += layer(None)  # backward recomputes one layer at a time
    if stage == layout.pp - 1:
        total += e * s * b * 2 * h / (tp if layout.sequence_parallel else 1)  # final norm + output layer inputs
    return total


def logits_bytes(arch: Any, layout: Layout, workload: Workload) -> float:
    """Peak bytes of the loss's vocab-parallel logits on one last-stage rank (see LOGIT_BYTES_*)."""
    vocab = padded_vocab(arch, layout.tp)
    per_el = LOGIT_BYTES_FP32_LOSS + (0 if workload.dtype == "fp32" else dtypes.nbytes(workload.dtype))
    if vocab != arch.vocab_size:
        per_el += LOGIT_BYTES_PADDED_VOCAB
    return workload.micro_batch_size * (workload.seq_length // layout.cp) * vocab / layout.tp * per_el
