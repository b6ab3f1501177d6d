"""Predict the memory one GPU needs for a training layout (pure functions): the plan and its verdict.

Used before anything is launched (``megatron-pz plan``, the scaling sweep, the sbatch pre-flight) to
reject layouts that cannot fit, and next to measured runs to check the prediction. Everything here is
arithmetic on a ``ModelArch`` (dense fields; MoE fields read with ``getattr``) and a few sizes.

Per GPU = the worst pipeline stage of:

  params       weights in the model dtype (bf16: 2 B, fp32: 4 B)
  grads        Megatron DDP's main-grad buffer, fp32 (4 B/param: ``grad_reduce_in_fp32`` in trainer/optimizer.py)
  optimizer    Adam m and v in fp32 (8 B/param) + an fp32 master copy when the weights are not fp32 (4 B);
               divided by DP x CP (expert params: by expert-DP) with the distributed optimizer (ZeRO-1)
  activations  what autograd keeps per layer and micro-batch, after Korthikanti et al. 2022 ("Reducing
               Activation Recomputation in Large Transformer Models", Table 2), times the micro-batches a
               1F1B pipeline stage holds at once (stage i of PP: min(PP - i, num_microbatches));
               the per-layer accounting is in ``plan.activations``
  logits       the last stage's vocab-parallel logits at the loss (``plan.activations.LOGIT_BYTES_*``)
  overhead     a fixed allowance: CUDA context, NCCL communicators, allocator fragmentation

Parameter counts per rank are ``plan.params``; model FLOPs (for MFU) are ``plan.flops``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_pz import dtypes
from megatron_pz.plan.activations import logits_bytes, stage_activation_bytes
from megatron_pz.plan.layout import Layout, Workload
from megatron_pz.plan.params import stage_param_counts

GIB = 1024 ** 3


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


def plan_memory(arch: Any, layout: Layout, workload: Workload, overhead_gib: float = 4.0) -> MemoryPlan:
    """Memory per GPU of every pipeline stage (only the first and the last differ) and the worst one."""
    e = dtypes.nbytes(workload.dtype)
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
