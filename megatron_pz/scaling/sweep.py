"""Scaling study: a grid of TP x PP x DP (x CP x EP, micro-batch, recompute) for one model -> CSV + PNG.

Every point is first checked (divisibility, sequence length, Megatron's rules) and planned (``megatron_pz.plan``:
memory per GPU); points that cannot fit are rejected with the reason before anything starts. The others run
``scaling.measure`` (the real train step on synthetic samples) in a fresh world each, locally; on a cluster,
``--points-only`` writes the point files for ``slurm/scaling.sbatch`` to run and ``--report`` collects them.

Output folder:
    sweep.json              every point's plan (and why rejected ones were rejected)
    points/NNN.point.json   the runnable points; NNN.result.json and NNN.log once run
    scaling.csv, scaling.png
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_pz.errors import ConfigError
from megatron_pz.plan.flops import model_flops_per_token, peak_tflops
from megatron_pz.plan.layout import Layout, Workload
from megatron_pz.plan.memory import GIB, MemoryPlan, plan_memory
from megatron_pz.scaling.measure import Point

COLUMNS = [
    "id", "label", "status", "reason", "model", "device", "tp", "pp", "dp", "cp", "ep", "sequence_parallel",
    "world_size", "micro_batch_size", "num_microbatches", "seq_length", "dtype", "recompute",
    "distributed_optimizer", "steps", "tokens_per_step", "step_time_s", "fwd_bwd_s", "grad_sync_s", "optimizer_s",
    "tokens_per_s", "tokens_per_s_per_gpu", "model_tflop_per_token_x1e6", "achieved_tflops_per_gpu",
    "peak_tflops_per_gpu", "peak_source", "mfu", "measured_peak_mem_gib", "pred_params_gib", "pred_grads_gib",
    "pred_optimizer_gib", "pred_activations_gib", "pred_logits_gib", "pred_alloc_gib", "pred_total_gib",
    "mem_pred_error_pct",
]


@dataclass
class SweepSpec:
    """The grid and the fixed workload of a sweep."""

    arch: Any  # ModelArch
    model: str
    tp: list[int]
    pp: list[int]
    dp: list[int]
    cp: list[int]
    ep: list[int]
    micro_batch_size: list[int]
    recompute: list[str | None]
    world_size: int | None = None  # fixes the world: DP = world / (TP x PP x CP), the dp list is ignored
    global_batch: int | None = None  # sequences per step; None = num_microbatches per DP rank
    num_microbatches: int = 4
    seq_length: int = 512
    prompt_length: int = 128
    dtype: str = "bf16"
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    steps: int = 3
    warmup: int = 1
    gpu_memory_gib: float = 80.0
    overhead_gib: float = 4.0
    on_gpu: bool = False


# ------------------------------------------------------------------------------------------- planning
def expand(spec: SweepSpec) -> list[tuple[Point | None, dict[str, Any]]]:
    """Every grid point as (runnable Point or None, row with its plan or the reason it was rejected)."""
    out = []
    for tp, pp, cp, ep, mbs, rc in itertools.product(spec.tp, spec.pp, spec.cp, spec.ep, spec.micro_batch_size,
                                                     spec.recompute):
        dps = spec.dp if spec.world_size is None else [spec.world_size // (tp * pp * cp) or 1]
        for dp in dps:
            row = dict(model=spec.model, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, sequence_parallel=spec.sequence_parallel,
                       world_size=tp * pp * cp * dp, micro_batch_size=mbs, seq_length=spec.seq_length,
                       dtype=spec.dtype, recompute=rc or "none", distributed_optimizer=spec.distributed_optimizer,
                       steps=spec.steps)
            point = None
            try:
                nmb = _check(spec, tp, pp, dp, cp, ep, mbs)
                row["num_microbatches"] = nmb
                point = Point(arch=spec.arch.to_dict(), tp=tp, pp=pp, dp=dp, cp=cp, ep=ep,
                              sequence_parallel=spec.sequence_parallel, micro_batch_size=mbs, num_microbatches=nmb,
                              seq_length=spec.seq_length, prompt_length=spec.prompt_length, dtype=spec.dtype,
                              recompute=rc, distributed_optimizer=spec.distributed_optimizer, steps=spec.steps,
                              warmup=spec.warmup)
                row["label"] = point.label
                plan = plan_point(spec, point)
                row.update(plan_columns(plan))
                fit = plan.fits(spec.gpu_memory_gib)
                row["status"], row["reason"] = ("planned", fit.reason) if fit else ("rejected", fit.reason)
                if not fit:
                    point = None
            except ConfigError as exc:
                row.update(status="rejected", reason=str(exc))
                row.setdefault("label", f"TP{tp} PP{pp} DP{dp}" + (f" CP{cp}" if cp > 1 else "")
                               + (f" EP{ep}" if ep > 1 else "") + f" mbs{mbs}")
                point = None
            out.append((point, row))
    return out


def _check(spec: SweepSpec, tp: int, pp: int, dp: int, cp: int, ep: int, mbs: int) -> int:
    """Raise ConfigError when the layout cannot run; returns the micro-batches per DP rank."""
    from megatron_pz.parallel import ParallelConfig

    spec.arch.validate_parallel(tp, pp, cp, ep)
    world = tp * pp * cp * dp
    if spec.world_size is not None and world != spec.world_size:
        raise ConfigError(f"world size {spec.world_size} is not divisible by TP x PP x CP = {tp * pp * cp}")
    pc = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
                        expert_model_parallel_size=ep, sequence_parallel=spec.sequence_parallel)
    pc.data_parallel_size(world)
    if getattr(spec.arch, "num_experts", None) and tp > 1 and not spec.sequence_parallel:
        raise ConfigError(f"an MoE model at TP={tp} needs sequence_parallel (Megatron-Core's MoE layer)")
    if spec.sequence_parallel and not spec.on_gpu:
        raise ConfigError("sequence_parallel needs Transformer Engine (a CUDA node)")
    multiple = 16 * (tp if spec.sequence_parallel else 1) * cp
    if spec.seq_length % multiple:
        raise ConfigError(f"seq_length={spec.seq_length} must be a multiple of {multiple} (16 x CP, x TP with SP)")
    if spec.seq_length > spec.arch.max_position_embeddings:
        raise ConfigError(f"seq_length={spec.seq_length} exceeds max_position_embeddings="
                          f"{spec.arch.max_position_embeddings}")
    if not 0 < spec.prompt_length < spec.seq_length:
        raise ConfigError(f"prompt_length={spec.prompt_length} must be in (0, seq_length)")
    if spec.global_batch is None:
        return spec.num_microbatches
    if spec.global_batch % (dp * mbs):
        raise ConfigError(f"global batch {spec.global_batch} is not divisible by DP x micro-batch = {dp} x {mbs}")
    return spec.global_batch // (dp * mbs)


def plan_point(spec: SweepSpec, p: Point) -> MemoryPlan:
    layout = Layout(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, etp=p.etp,
                    sequence_parallel=p.sequence_parallel)
    work = Workload(micro_batch_size=p.micro_batch_size, seq_length=p.seq_length,
                    num_microbatches=p.num_microbatches, dtype=p.dtype,
                    distributed_optimizer=p.distributed_optimizer, recompute=p.recompute,
                    flash_attention=spec.on_gpu, fused_swiglu=spec.on_gpu)
    return plan_memory(spec.arch, layout, work, overhead_gib=spec.overhead_gib)


def plan_columns(plan: MemoryPlan) -> dict[str, float]:
    b = plan.breakdown_gib()
    return {"pred_params_gib": b["params"], "pred_grads_gib": b["grads"], "pred_optimizer_gib": b["optimizer"],
            "pred_activations_gib": b["activations"], "pred_logits_gib": b["logits"],
            "pred_alloc_gib": plan.worst.allocated / GIB, "pred_total_gib": b["total"]}


# ------------------------------------------------------------------------------------------- running
def write_points(spec: SweepSpec, out: Path) -> list[dict[str, Any]]:
    """Plan the grid, write sweep.json and the runnable points; returns the rows."""
    (out / "points").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (point, row) in enumerate(expand(spec)):
        row["id"] = f"{i:03d}"
        if point is not None:
            (out / "points" / f"{row['id']}.point.json").write_text(json.dumps(asdict(point)))
        rows.append(row)
    (out / "sweep.json").write_text(json.dumps({"spec": {k: v for k, v in asdict(spec).items() if k != "arch"},
                                                "arch": spec.arch.to_dict(), "rows": rows}, indent=1, default=str))
    return rows


def run_points(out: Path, rows: list[dict[str, Any]], threads_total: int | None, timeout_s: float,
               log=print) -> None:
    """Run every planned point in its own process tree (``scaling.measure``), one after the other."""
    for row in rows:
        if row["status"] != "planned":
            continue
        pid = row["id"]
        point_file, result = out / "points" / f"{pid}.point.json", out / "points" / f"{pid}.result.json"
        point = json.loads(point_file.read_text())
        if threads_total:
            point["threads"] = max(1, threads_total // row["world_size"])
            point_file.write_text(json.dumps(point))
        log(f"[{pid}] {row['label']}: running {row['world_size']} rank(s) ...")
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS=str(point.get("threads") or 1))
        with open(out / "points" / f"{pid}.log", "w") as logf:
            try:
                proc = subprocess.run([sys.executable, "-m", "megatron_pz.scaling.measure", "--point", str(point_file),
                                       "--out", str(result)], stdout=logf, stderr=subprocess.STDOUT, env=env,
                                      timeout=timeout_s)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        log(f"[{pid}] done in {time.time() - t0:.0f}s" + ("" if rc == 0 else f" (failed: {rc}; see {pid}.log)"))


def collect(out: Path) -> list[dict[str, Any]]:
    """Rows of sweep.json merged with the measured results found under points/."""
    sweep = json.loads((out / "sweep.json").read_text())
    spec, arch = sweep["spec"], sweep["arch"]
    from megatron_pz.model.arch import ModelArch

    arch = ModelArch.from_dict(arch)
    rows = []
    for row in sweep["rows"]:
        row = dict(row)
        result = out / "points" / f"{row['id']}.result.json"
        if row["status"] == "planned" and result.exists():
            row.update(measured_columns(json.loads(result.read_text()), arch, spec))
        elif row["status"] == "planned" and (out / "points" / f"{row['id']}.log").exists():
            row.update(status="failed", reason=_last_error(out / "points" / f"{row['id']}.log"))
        rows.append(row)
    return rows


def measured_columns(result: dict[str, Any], arch: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Throughput, time breakdown, FLOPs and memory of one measured point."""
    p = Point.from_dict(result["point"])
    ranks = result["ranks"]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    step = mean(ranks[0]["step_s"])  # barrier to barrier: the same on every rank
    grad_sync = max(mean(r["grad_sync_s"]) for r in ranks)
    optim = max(mean(r["optimizer_s"]) for r in ranks)
    tokens = p.dp * p.num_microbatches * p.micro_batch_size * p.seq_length
    flops_tok = model_flops_per_token(arch, p.seq_length)
    achieved = flops_tok * tokens / step / p.world_size / 1e12
    device_name = ranks[0]["device"]
    peak, source = None, ""
    if spec.get("peak_tflops"):
        peak, source = spec["peak_tflops"], "given"
    elif device_name != "cpu":
        peak, source = peak_tflops(device_name, p.dtype), "datasheet"
    else:
        peak, source = mean([r["matmul_gflops"] for r in ranks]) / 1e3, "measured fp32 matmul"
    measured = max(r["peak_bytes"] for r in ranks) / GIB
    return {"status": "ok", "reason": "", "device": device_name, "tokens_per_step": tokens, "step_time_s": step,
            "fwd_bwd_s": step - grad_sync - optim, "grad_sync_s": grad_sync, "optimizer_s": optim,
            "tokens_per_s": tokens / step, "tokens_per_s_per_gpu": tokens / step / p.world_size,
            "model_tflop_per_token_x1e6": flops_tok / 1e6, "achieved_tflops_per_gpu": achieved,
            "peak_tflops_per_gpu": peak, "peak_source": source, "mfu": achieved / peak if peak else None,
            "measured_peak_mem_gib": measured}


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or ["no output"])[-1][:300]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    for row in rows:
        if row.get("measured_peak_mem_gib") and row.get("pred_alloc_gib"):
            row["mem_pred_error_pct"] = 100.0 * (row["pred_alloc_gib"] / row["measured_peak_mem_gib"] - 1)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in COLUMNS})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else v
