"""What a training step runs and where: the parallel ``Layout`` and the per-DP-rank ``Workload`` the planner reads.

Both are frozen dataclasses checked on construction, so a plan is never made for a layout Megatron would refuse
on a dimension below 1, or for a dtype / recompute setting the trainer does not know.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_pz import dtypes

RECOMPUTE = (None, "selective", "full")


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
    # Keys per query whose scores unfused attention keeps; None = seq_length (the segment attention of shared-prompt
    # rows keeps fewer: plan.archs.score_keys)
    score_keys: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in dtypes.SHORT_NAMES:
            raise ValueError(f"Workload.dtype must be one of {sorted(dtypes.SHORT_NAMES)}, got {self.dtype!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"Workload.recompute must be None, 'selective' or 'full', got {self.recompute!r}")
        if self.micro_batch_size < 1 or self.seq_length < 1:
            raise ValueError("Workload: micro_batch_size and seq_length must be >= 1")
