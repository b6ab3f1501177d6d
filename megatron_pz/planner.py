"""Predict the memory one GPU needs for a training layout, and the model FLOPs of a step (pure functions).

Used before anything is launched (``megatron-pz bench plan``, the scaling sweep, the sbatch pre-flight) to
reject layouts that cannot fit, and next to measured runs to check the prediction. Everything here is
arithmetic on a ``ModelArch`` (dense fields; MoE fields read with ``getattr``) and a few sizes.

Per GPU = the worst pipeline stage of:

  params       weights in the model dtype (bf16: 2 B, fp32: 4 B)
  grads        Megatron DDP's main-grad buffer, fp32 (4 B/param: ``grad_reduce_in_fp32`` in trainer/optimizer.py)
  optimizer    Adam m and v in fp32 (8 B/param) + an fp32 master copy when the weights are not fp32 (4 B);
               divided by DP x CP (expert params: by expert-DP) with the distributed optimizer (ZeRO-1)
  activations  what autograd keeps per layer and micro-batch, after Korthikanti et al. 2022 ("Reducing
               Activation Recomputation in Large Transformer Models", Table 2), times the micro-batches a
               1F1B pipeline stage holds at once (stage i of PP: min(PP - i, num_microbatches))
  logits       the last stage's vocab-parallel logits at the loss (see LOGIT_BYTES_*)
  overhead     a fixed allowance: CUDA context, NCCL communicators, allocator fragmentation

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

FLOPs: 6 * N_matmul per token (forward 2N, backward 4N) + 12 * L * s * q per token for attention scores and
values (PaLM, Chowdhery et al. 2022, App. B; the full s x s matrix, no causal halving, as Megatron-LM and
PaLM count it). N_matmul counts the weights of every matmul a token passes through, including the output
layer (logits) but not the embedding lookup; MoE counts the top-k experts and the router. Recomputation is
not counted (model FLOPs, not hardware FLOPs), so MFU is comparable across recompute settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
RECOMPUTE = (None, "selective", "full")

# Bytes per logit element alive at the peak of the loss on the last stage (trainer/step.py -> logprobs.py):
# the model-dtype logits (dropped when already fp32: .float() is then a no-op) + fp32 scaled logits (4)
# + the clone vocab_parallel_cross_entropy turns into the softmax it saves for backward (4) + token_entropy's
# temporaries, all fp32 (logits - max, exp, nan_to_num, their product: 16). + 4 on the TP rank that holds
# padded vocab rows (masked_fill copies). token_entropy now works in row chunks, which removes the 16 B of
# entropy temporaries; the constant still counts them (conservative) until the CPU sweep and the tables in
# docs/scaling.md are re-measured with the chunked version.
LOGIT_BYTES_FP32_LOSS = 4 + 4 + 16
LOGIT_BYTES_PADDED_VOCAB = 4

# Dense peak TFLOP/s per device for 16-bit matmuls (vendor data sheets, dense, no sparsity).
PEAK_TFLOPS_16BIT = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0, "GH200": 989.4}


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Layout:
    """Parallel sizes. DP is explicit here; world size = TP x PP x CP x DP."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel size; None = tp (Megatron's default)
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name} must be >= 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard: world / (PP x EP x ETP) (Megatron's expert-data-parallel group)."""
        return max(1, self.world_size // (self.pp * self.ep * self.expert_tp))

    @property
    def label(self) -> str:
        s = f"TP{self.tp} PP{self.pp} DP{self.dp}"
        if self.cp > 1:
            s += f" CP{self.cp}"
        if self.ep > 1:
            s += f" EP{self.ep}"
        if self.etp is not None and self.etp != self.tp:
            s += f" ETP{self.etp}"
        return s + (" SP" if self.sequence_parallel else "")


@dataclass(frozen=True)
class Workload:
    """What one step runs on each DP rank, and how."""

    micro_batch_size: int
    seq_length: int
    num_microbatches: int | None = None  # per DP rank per step; None = enough to fill the pipeline
    dtype: str = "bf16"  # model weights and activations
    distributed_optimizer: bool = True
    recompute: str | None = None  # None | "selective" | "full" (full = every layer's input kept)
    flash_attention: bool = True  # Transformer Engine fused attention (GPU); False = Megatron's local spec
    fused_swiglu: bool = True  # GPU bias-SwiGLU fusion keeps only its input; False on CPU
    grad_bytes: int = 4  # main-grad buffer dtype (fp32)
    dropout: bool = False  # RL runs without dropout (model/provider.py)
    softmax_fp32: bool = True  # attention_softmax_in_fp32 (unfused attention only)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"Workload.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"Workload.recompute must be None, 'selective' or 'full', got {self.recompute!r}")
        if self.micro_batch_size < 1 or self.seq_length < 1:
            raise ValueError("Workload: micro_batch_size and seq_length must be >= 1")


# ------------------------------------------------------------------------------------------- outputs
@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    param_count: int
    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def allocated(self) -> float:
        """What the framework allocates (comparable to torch.cuda.max_memory_allocated / an RSS delta)."""
        return self.params + self.grads + self.optimizer + self.activations + self.logits


@dataclass
class Fit:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class MemoryPlan:
    """Per-stage predictions; the worst stage decides."""

    layout: Layout
    workload: Workload
    stages: list[StageMemory]
    overhead: float
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda m: m.allocated)

    @property
    def total(self) -> float:
        """Bytes per GPU including the fixed overhead."""
        return self.worst.allocated + self.overhead

    def breakdown_gib(self) -> dict[str, float]:
        w = self.worst
        return {"params": w.params / GIB, "grads": w.grads / GIB, "optimizer": w.optimizer / GIB,
                "activations": w.activations / GIB, "logits": w.logits / GIB, "overhead": self.overhead / GIB,
                "total": self.total / GIB}

    def fits(self, gpu_memory_gib: float) -> Fit:
        """Whether the worst stage fits ``gpu_memory_gib``; the reason names the biggest parts and a remedy."""
        b = self.breakdown_gib()
        parts = ", ".join(f"{k} {b[k]:.1f}" for k in ("params", "grads", "optimizer", "activations", "logits",
                                                      "overhead"))
        where = f"pipeline stage {self.worst.stage}" if self.layout.pp > 1 else "each rank"
        if b["total"] <= gpu_memory_gib:
            return Fit(True, f"fits: {b['total']:.1f} of {gpu_memory_gib:.1f} GiB on {where} ({parts} GiB)")
        biggest = max(("params", "grads", "optimizer", "activations", "logits"), key=lambda k: b[k])
        hint = {
            "activations": "recompute (selective/full), a smaller micro_batch_size, sequence_parallel, or more "
                           "TP/CP/PP",
            "logits": "a smaller micro_batch_size or more TP (logits are vocab-sharded over TP)",
            "optimizer": "the distributed optimizer and more DP, or more TP/PP/EP",
        }.get(biggest, "more TP/PP (or EP for experts)")
        return Fit(False, f"needs {b['total']:.1f} GiB on {where} > {gpu_memory_gib:.1f} GiB ({parts} GiB); the "
                          f"largest part is {biggest}: try {hint}")


# ------------------------------------------------------------------------------------------- parameters
def _moe(arch: Any) -> tuple[int, int, int] | None:
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
    moe = _moe(arch)
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


# ------------------------------------------------------------------------------------------- activations
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
    e = DTYPE_BYTES[workload.dtype]
    s = workload.seq_length // layout.cp
    b = workload.micro_batch_size
    h, tp = arch.hidden_size, layout.tp
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    moe = _moe(arch)
    if moe is None:
        f = arch.ffn_hidden_size
        w1, w2 = 2 * f + (0 if workload.fused_swiglu else f), f
    else:
        w1 = w2 = 0
    kw = dict(s=s, b=b, h=h, heads=arch.num_attention_heads, q=q, kv=kv, w1=w1, w2=w2, e=e, tp=tp,
              sp=layout.sequence_parallel, flash=workload.flash_attention, dropout=workload.dropout,
              softmax_fp32=workload.softmax_fp32, qk_norm=arch.qk_norm, s_kv=workload.seq_length)

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
    per_el = LOGIT_BYTES_FP32_LOSS + (0 if workload.dtype == "fp32" else DTYPE_BYTES[workload.dtype])
    if vocab != arch.vocab_size:
        per_el += LOGIT_BYTES_PADDED_VOCAB
    return workload.micro_batch_size * (workload.seq_length // layout.cp) * vocab / layout.tp * per_el


# ------------------------------------------------------------------------------------------- the plan
def plan_memory(arch: Any, layout: Layout, workload: Workload, overhead_gib: float = 4.0) -> MemoryPlan:
    """Memory per GPU of every pipeline stage (only the first and the last differ) and the worst one."""
    e = DTYPE_BYTES[workload.dtype]
    master = 0 if workload.dtype == "fp32" else 4
    opt_per_param = 8 + master
    dense_shards = layout.dp * layout.cp if workload.distributed_optimizer else 1
    expert_shards = layout.expert_dp if workload.distributed_optimizer else 1
    stages = sorted({0, layout.pp - 1})
    out = []
    for st in stages:
        dense, expert = stage_param_counts(arch, layout, st)
        n = dense + expert
        out.append(StageMemory(
            stage=st, param_count=n, params=e * n, grads=workload.grad_bytes * n,
            optimizer=opt_per_param * (dense / dense_shards + expert / expert_shards),
            activations=stage_activation_bytes(arch, layout, workload, st),
            logits=logits_bytes(arch, layout, workload) if st == layout.pp - 1 else 0.0))
    notes = []
    if workload.recompute == "full":
        notes.append("full recompute: every layer's input kept, one layer recomputed at a time")
    if not workload.flash_attention:
        notes.append("unfused attention: softmax scores kept (a*s^2 per layer)")
    return MemoryPlan(layout, workload, out, overhead_gib * GIB, notes)


# ------------------------------------------------------------------------------------------- FLOPs
def matmul_params(arch: Any) -> int:
    """Weights of the matmuls one token passes through (active experts only, output layer included)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    moe = _moe(arch)
    mlp = 3 * h * arch.ffn_hidden_size if moe is None else moe[2] * 3 * h * moe[1] + moe[0] * h
    return arch.num_layers * (h * (q + 2 * kv) + q * h + mlp) + arch.vocab_size * h


def model_flops_per_token(arch: Any, seq_length: int) -> float:
    """Training FLOPs per token: 6 N_matmul + 12 L s q (see the module docstring)."""
    q = arch.num_attention_heads * arch.head_dim
    return 6.0 * matmul_params(arch) + 12.0 * arch.num_layers * seq_length * q


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense 16-bit peak of a known GPU (by name, e.g. 'NVIDIA H100 80GB HBM3'); None when unknown or fp32."""
    if dtype not in ("bf16", "fp16"):
        return None
    name = device_name.upper()
    for key in sorted(PEAK_TFLOPS_16BIT, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS_16BIT[key]
    return None
