"""Measure one layout: the real train step on synthetic samples, timed, with peak memory (one world per point).

What is measured is ``trainer.step.train_step`` (Megatron's pipeline schedule, the GRPO loss with vocab-parallel
log-probs, finalize_model_grads, the distributed optimizer) after ``trainer.optimizer.setup_training``, on
random weights and synthetic samples of a fixed prompt/response length. No rollouts: a scaling study of the
trainer should not wait on generation, and this is much faster than full RL steps.

Per step: wall time (barrier to barrier), split into forward+backward (the schedule), grad sync
(finalize_model_grads: DP reduce-scatter/all-reduce, embedding-group all-reduce) and optimizer (step,
including the distributed optimizer's parameter all-gather). Peak memory: ``torch.cuda.max_memory_allocated``
on GPU; on CPU the peak RSS (``getrusage``) minus the RSS right before the model is built.

    python -m megatron_pz.scaling.measure --point point.json --out result.json
spawns TP x PP x CP x DP local processes (gloo on CPU, NCCL on GPU); under torchrun/srun (RANK and
WORLD_SIZE set) it runs as one rank of that world instead.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Point:
    """One grid point: layout, workload and model (as a ModelArch dict)."""

    arch: dict[str, Any]
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    num_microbatches: int = 1  # per DP rank per step
    seq_length: int = 512
    prompt_length: int = 128  # the loss covers seq_length - prompt_length response tokens
    dtype: str = "bf16"
    recompute: str | None = None
    distributed_optimizer: bool = True
    steps: int = 3
    warmup: int = 1
    threads: int | None = None  # torch threads per rank (CPU)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def label(self) -> str:
        s = f"TP{self.tp} PP{self.pp} DP{self.dp}"
        s += f" CP{self.cp}" if self.cp > 1 else ""
        s += f" EP{self.ep}" if self.ep > 1 else ""
        s += " SP" if self.sequence_parallel else ""
        s += f" mbs{self.micro_batch_size}"
        return s + (f" rc-{self.recompute}" if self.recompute else "")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(**d)


# ------------------------------------------------------------------------------------------- memory helpers
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def matmul_gflops(seconds: float = 1.0, n: int = 1024, dtype: Any = None) -> float:
    """This process's sustained matmul rate (CPU: fp32; GPU: bf16), the reference peak on CPU."""
    import torch

    from megatron_pz import device

    dev = device.default_device()
    dtype = dtype or (torch.bfloat16 if device.cuda_available() else torch.float32)
    if device.cuda_available():
        n = max(n, 8192)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    _sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        if device.cuda_available() and count % 10:
            continue
        _sync()
    _sync()
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e9


def _sync() -> None:
    import torch

    from megatron_pz import device

    if device.cuda_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- the worker
def synthetic_microbatches(p: Point, vocab_size: int, dp_rank: int) -> list:
    """``num_microbatches x micro_batch_size`` samples of exactly seq_length tokens, same on one DP replica."""
    import random

    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.types import Sample, Status, Task

    rng = random.Random(1000 + dp_rank)  # every TP/PP/CP rank of a DP replica builds the same samples
    resp = p.seq_length - p.prompt_length
    samples = []
    for i in range(p.num_microbatches * p.micro_batch_size):
        samples.append(Sample(
            task=Task.MASK_PRED, group_id=f"g{i // 2}",
            prompt_ids=[rng.randrange(vocab_size) for _ in range(p.prompt_length)],
            response_ids=[rng.randrange(vocab_size) for _ in range(resp)],
            rollout_logprobs=[-2.0] * resp, status=Status.COMPLETED, advantage=1.0 if i % 2 else -1.0))
    multiple = 8 * (p.tp if p.sequence_parallel else 1) * 2 * p.cp
    return build_microbatches(samples, p.micro_batch_size, pad_id=0, seq_multiple=multiple,
                              same_length=p.pp > 1)


def _timed(fn, bucket: list[float]):
    def wrapper(*args, **kwargs):
        _sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync()
        bucket.append(time.perf_counter() - t0)
        return out

    return wrapper


def run_point(point: dict[str, Any], out_path: str) -> None:
    """One rank: build, train ``warmup + steps`` steps, gather timings and memory to rank 0, write JSON."""
    import torch

    from megatron_pz import device
    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.config import OptimConfig
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model, unwrap
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.trainer.optimizer import setup_training
    from megatron_pz.trainer.step import train_step

    p = Point.from_dict(point)
    if p.threads:
        torch.set_num_threads(p.threads)
    pc = ParallelConfig(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                        context_parallel_size=p.cp, expert_model_parallel_size=p.ep,
                        expert_tensor_parallel_size=p.etp, sequence_parallel=p.sequence_parallel)
    init_distributed(pc)
    from megatron.core import parallel_state as ps

    dist = torch.distributed
    on_gpu = device.cuda_available()
    dist.barrier()
    matmul = matmul_gflops()  # all ranks at once: the rate they get when they share the machine
    baseline = rss_bytes()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    arch = ModelArch.from_dict(p.arch)
    full = p.recompute == "full"
    mcfg = ModelConfig(dtype=p.dtype, recompute_granularity=p.recompute,
                       recompute_method="uniform" if full else None, recompute_num_layers=1 if full else None)
    model = build_model(arch, mcfg, pc)
    state = setup_training(model, OptimConfig(lr=1e-6, use_distributed_optimizer=p.distributed_optimizer),
                           total_steps=p.warmup + p.steps)
    mbs = synthetic_microbatches(p, arch.vocab_size, ps.get_data_parallel_rank())
    grad_sync: list[float] = []
    optim: list[float] = []
    tcfg = unwrap(state.model[0]).config
    tcfg.finalize_model_grads_func = _timed(tcfg.finalize_model_grads_func, grad_sync)
    state.optimizer.step = _timed(state.optimizer.step, optim)
    step_times: list[float] = []
    loss_cfg = LossConfig()
    for _ in range(p.warmup + p.steps):
        dist.barrier()
        _sync()
        t0 = time.perf_counter()
        metrics = train_step(state, mbs, loss_cfg, arch.vocab_size, 1.0)
        _sync()
        dist.barrier()
        step_times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base_alloc) if on_gpu else peak_rss_bytes() - baseline
    w = p.warmup
    mine = dict(rank=dist.get_rank(), pp_stage=ps.get_pipeline_model_parallel_rank(),
                step_s=step_times[w:], grad_sync_s=grad_sync[w:], optimizer_s=optim[w:], peak_bytes=int(peak),
                matmul_gflops=matmul, grad_norm=metrics.get("train/grad_norm"),
                device=torch.cuda.get_device_name() if on_gpu else "cpu")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        from megatron_pz.io import atomic_write_text

        atomic_write_text(out_path, json.dumps({"point": point, "ranks": gathered}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_pz.scaling.measure", description=__doc__.splitlines()[0])
    ap.add_argument("--point", required=True, help="JSON file of one Point")
    ap.add_argument("--out", required=True, help="result JSON (written by rank 0)")
    args = ap.parse_args(argv)
    point = json.loads(open(args.point).read())
    p = Point.from_dict(point)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun / srun: this process is one rank
        if int(os.environ["WORLD_SIZE"]) != p.world_size:
            print(f"measure: WORLD_SIZE={os.environ['WORLD_SIZE']} but the point needs {p.world_size}",
                  file=sys.stderr)
            return 2
        from megatron_pz.parallel import destroy_distributed

        try:
            run_point(point, args.out)
        finally:
            destroy_distributed()
        return 0
    from megatron_pz.parallel import spawn_local

    # glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its arenas, so the RSS of
    # a CPU run would track the allocator's high water, not live tensors; a small fixed threshold returns
    # every large block on free. Read by glibc at process start, so it is set for the spawned ranks.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    spawn_local(run_point, p.world_size, (point, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
