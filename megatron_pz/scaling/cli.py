"""``megatron-pz scaling ...``: the scaling-sweep command (flags -> ``SweepSpec`` -> plan, run, CSV + PNG).

    megatron-pz scaling --model tiny --tp 1,2 --pp 1,2 --world-size 2 --out runs/bench/scaling
    megatron-pz scaling --config RUN.yaml --tp 1,2,4 --world-size 8 --dry-run      # plan only
    megatron-pz scaling --out DIR --report                                           # CSV + PNG from DIR

The sweep itself is ``scaling.sweep``; one point's measurement is ``scaling.measure``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_pz.dtypes import SHORT_NAMES
from megatron_pz.errors import ConfigError, UserError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _recompute(text: str) -> list[str | None]:
    out: list[str | None] = []
    for x in text.split(","):
        if x not in ("none", "selective", "full"):
            raise argparse.ArgumentTypeError(f"recompute values are none, selective, full; got {x!r}")
        out.append(None if x == "none" else x)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    from megatron_pz.scaling import sweep

    p = sub.add_parser("scaling", help="sweep TP x PP x DP (x CP x EP, micro-batch, recompute): CSV + PNG",
                       description=sweep.__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=sweep.__doc__)
    m = p.add_argument_group("model and workload (defaults from --config when given)")
    m.add_argument("--config", default=None, help="run file: model (policy.load), micro-batch, lengths, dtype, "
                                                  "recompute, layout and global batch")
    m.add_argument("--model", default=None, help="preset (tiny, qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b, "
                                                 "qwen3-30b-a3b, ...), 'smollm2', HF folder, or checkpoint")
    m.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default 512)")
    m.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (not in the loss; default 1/4)")
    m.add_argument("--dtype", choices=SHORT_NAMES, default=None,
                   help="default: bf16 on GPU, fp32 on CPU")
    m.add_argument("--global-batch", type=int, default=None, help="sequences per step, kept across layouts")
    m.add_argument("--num-microbatches", type=int, default=None, help="per DP rank (when no --global-batch; 4)")
    m.add_argument("--sequence-parallel", action="store_true")
    m.add_argument("--no-distributed-optimizer", action="store_true")
    g = p.add_argument_group("grid (comma-separated values)")
    g.add_argument("--tp", type=_ints, default=None)
    g.add_argument("--pp", type=_ints, default=None)
    g.add_argument("--dp", type=_ints, default=None, help="ignored with --world-size")
    g.add_argument("--cp", type=_ints, default=None)
    g.add_argument("--ep", type=_ints, default=None)
    g.add_argument("--mbs", type=_ints, default=None, help="micro-batch sizes")
    g.add_argument("--recompute", type=_recompute, default=None, help="none,selective,full")
    g.add_argument("--world-size", type=int, default=None, help="fix the world; DP = world / (TP x PP x CP)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/bench/scaling", help="output folder")
    r.add_argument("--steps", type=int, default=3, help="timed steps per point (after --warmup)")
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--memory-gib", type=float, default=None,
                   help="memory per rank for the planner's verdict (default: the GPU's, or host memory / world)")
    r.add_argument("--overhead-gib", type=float, default=None, help="planner's fixed allowance (gpu 4, cpu 0.5)")
    r.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak for MFU (default: datasheet "
                                                                   "for known GPUs; CPU: measured matmul)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads shared by a point's ranks "
                                                             "(default: all cores)")
    r.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    r.add_argument("--target", choices=["gpu", "cpu"], default=None,
                   help="plan for this device (kernels, memory); default: this machine's. gpu on a CPU machine "
                        "only with --dry-run or --points-only")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="plan every point, run nothing")
    mode.add_argument("--points-only", action="store_true",
                      help="plan and write points/*.point.json for an external launcher (slurm/scaling.sbatch)")
    mode.add_argument("--report", action="store_true", help="only rebuild scaling.csv/png from --out")
    p.set_defaults(func=run)


def _spec_from_args(args: argparse.Namespace):
    from megatron_pz import device
    from megatron_pz.plan import archs
    from megatron_pz.plan.dry_run import H100_GIB, host_memory_gib
    from megatron_pz.scaling.sweep import SweepSpec

    on_gpu = device.cuda_available() if args.target is None else args.target == "gpu"
    if on_gpu and not device.cuda_available() and not (args.dry_run or args.points_only):
        raise ConfigError("--target gpu on a machine without CUDA: add --dry-run (or --points-only)")
    d = dict(model="tiny", seq_length=512, prompt_length=None, dtype="bf16" if on_gpu else "fp32", tp=[1], pp=[1],
             dp=[1], cp=[1], ep=[1], mbs=[1], recompute=[None], global_batch=None, sequence_parallel=False,
             distributed_optimizer=True)
    arch = None
    if args.config:
        from megatron_pz.config import load_config

        cfg = load_config(args.config)
        pc = cfg.parallel
        arch = archs.resolve_arch(args.model or cfg.policy.load, vocab_size=cfg.policy.vocab_size,
                                  allow_pickle=cfg.policy.allow_pickle)
        d.update(model=args.model or cfg.policy.load, seq_length=archs.seq_length_of(cfg),
                 prompt_length=cfg.corpus.max_prompt_tokens, dtype=cfg.model.dtype,
                 tp=[pc.tensor_model_parallel_size], pp=[pc.pipeline_model_parallel_size],
                 cp=[pc.context_parallel_size], ep=[pc.expert_model_parallel_size],
                 mbs=[cfg.train.micro_batch_size], recompute=[cfg.model.recompute_granularity],
                 global_batch=archs.samples_per_dp_rank(cfg, 1), sequence_parallel=pc.sequence_parallel,
                 distributed_optimizer=cfg.optim.use_distributed_optimizer)
    for key, val in (("model", args.model), ("seq_length", args.seq_length), ("prompt_length", args.prompt_length),
                     ("dtype", args.dtype), ("tp", args.tp), ("pp", args.pp), ("dp", args.dp), ("cp", args.cp),
                     ("ep", args.ep), ("mbs", args.mbs), ("recompute", args.recompute),
                     ("global_batch", args.global_batch)):
        if val is not None:
            d[key] = val
    if args.num_microbatches is not None:
        d["global_batch"] = args.global_batch
    if args.sequence_parallel:
        d["sequence_parallel"] = True
    if args.no_distributed_optimizer:
        d["distributed_optimizer"] = False
    if arch is None or args.model:
        arch = archs.resolve_arch(d["model"])
    world = args.world_size
    if args.memory_gib is not None:
        memory = args.memory_gib
    elif on_gpu and device.cuda_available():
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    elif on_gpu:
        memory = H100_GIB
    else:
        memory = host_memory_gib() / max(world or max(t * p * c * dp for t in d["tp"] for p in d["pp"]
                                                      for c in d["cp"] for dp in d["dp"]), 1)
    return SweepSpec(
        arch=arch, model=str(d["model"]), tp=d["tp"], pp=d["pp"], dp=d["dp"], cp=d["cp"], ep=d["ep"],
        micro_batch_size=d["mbs"], recompute=d["recompute"], world_size=world, global_batch=d["global_batch"],
        num_microbatches=args.num_microbatches or 4, seq_length=d["seq_length"],
        prompt_length=d["prompt_length"] or d["seq_length"] // 4, dtype=d["dtype"],
        sequence_parallel=d["sequence_parallel"], distributed_optimizer=d["distributed_optimizer"],
        steps=args.steps, warmup=args.warmup, gpu_memory_gib=memory,
        overhead_gib=args.overhead_gib if args.overhead_gib is not None else (4.0 if on_gpu else 0.5),
        on_gpu=on_gpu)


def run(args: argparse.Namespace) -> int:
    """Plan the grid, run the planned points (unless --dry-run/--points-only), write CSV + PNG; or only --report."""
    import json

    from megatron_pz.scaling import plot, sweep

    out = Path(args.out)
    if args.report:
        if not (out / "sweep.json").exists():
            raise UserError(f"{out}/sweep.json not found: run the sweep (or --points-only) into --out first")
    else:
        spec = _spec_from_args(args)
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps must be >= 1 and --warmup >= 0")
        rows = sweep.write_points(spec, out)
        meta = json.loads((out / "sweep.json").read_text())
        meta["spec"]["peak_tflops"] = args.peak_tflops
        (out / "sweep.json").write_text(json.dumps(meta, indent=1, default=str))
        _print_plan(rows, spec)
        if args.points_only:
            print(f"wrote {sum(r['status'] == 'planned' for r in rows)} point(s) to {out}/points")
            return 0
        if not args.dry_run:
            threads = None if spec.on_gpu else (args.threads or os.cpu_count())
            sweep.run_points(out, rows, threads, args.timeout)
    rows = sweep.collect(out)
    sweep.write_csv(rows, out / "scaling.csv")
    meta = json.loads((out / "sweep.json").read_text())
    s = meta["spec"]
    title = (f"{s['model']}: seq {s['seq_length']}, {s['dtype']}, "
             f"{'GPU' if s.get('on_gpu') else 'CPU (gloo)'}, memory limit {float(s['gpu_memory_gib']):.0f} GiB/rank")
    png = plot.plot_sweep(rows, out / "scaling.png", title)
    _print_results(rows)
    print(f"wrote {out / 'scaling.csv'} and {png}")
    return 0 if all(r["status"] in ("ok", "planned", "rejected") for r in rows) else 1


def _print_plan(rows: list[dict], spec) -> None:
    print(f"{len(rows)} point(s); memory limit {spec.gpu_memory_gib:.1f} GiB per rank")
    for r in rows:
        mem = f"{r['pred_total_gib']:6.1f} GiB" if "pred_total_gib" in r else " " * 10
        why = r["reason"] if r["status"] != "planned" else ""
        print(f"  [{r['id']}] {r['label']:<28} {r['status']:<9} {mem}  {why}")


def _print_results(rows: list[dict]) -> None:
    for r in rows:
        if r["status"] == "ok":
            mfu = f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
            print(f"  [{r['id']}] {r['label']:<28} {r['tokens_per_s_per_gpu']:9.1f} tok/s/rank  step "
                  f"{r['step_time_s']:.2f}s  mem {r['measured_peak_mem_gib']:.2f} GiB (pred "
                  f"{r['pred_alloc_gib']:.2f})  {mfu}")
        elif r["status"] == "failed":
            print(f"  [{r['id']}] {r['label']:<28} FAILED: {r['reason']}")
