"""``megatron-pz bench KIND ...``: one sub-subcommand per benchmark kind (compare, scaling, plan).

Plain ``megatron-pz bench`` runs ``bench compare`` with its defaults (examples/bench_cpu.yaml vs TRL).

A new kind is a function ``_register_<kind>(kinds)`` added to KINDS; it adds its parser and sets ``func``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_pz.errors import ConfigError, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks and plans: ours vs TRL (default), scaling sweeps, config checks",
                       description=__doc__.splitlines()[0])
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND")
    parsers = {}
    for reg in KINDS:
        parsers[reg.__name__] = reg(kinds)
    compare_parser = parsers["_register_compare"]
    p.set_defaults(func=lambda a: _compare(compare_parser.parse_args([])))


# ------------------------------------------------------------------------------------------- compare
def _register_compare(kinds: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from megatron_pz.bench import compare

    p = kinds.add_parser("compare", help="the same workload through megatron_pz and TRL's GRPOTrainer (the default)",
                         description=compare.__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=compare.__doc__)
    p.add_argument("--config", default=compare.DEFAULT_CONFIG, help=f"run file (default {compare.DEFAULT_CONFIG})")
    p.add_argument("--out", default="runs/bench/compare", help="output folder (bench.json, bench.md, logs)")
    p.add_argument("--steps", type=int, default=None, help="steps per side, warm-up included (default: train.steps)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of the figures")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--no-pretrainzero", action="store_true", help="skip the full PretrainZero run of our side")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run file, for every side")
    p.set_defaults(func=_compare)
    return p


def _compare(args: argparse.Namespace) -> int:
    from megatron_pz.bench.compare import main_from_args

    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    return main_from_args(args)


# ------------------------------------------------------------------------------------------- plan
def _register_plan(kinds: argparse._SubParsersAction) -> None:
    from megatron_pz.bench import validate

    p = kinds.add_parser("plan", help="dry-run: validate a run config for a world size and predict memory per GPU",
                         description=validate.__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=validate.__doc__)
    p.add_argument("--config", required=True, help="run file (YAML)")
    p.add_argument("--world-size", type=int, required=True, help="training ranks (GPUs) the job will have")
    p.add_argument("--model", default=None,
                   help="architecture to plan for instead of policy.load (a preset such as qwen3-4b, an HF "
                        "folder/config.json, or a checkpoint): for configs whose weights are not on this machine")
    p.add_argument("--target", choices=["gpu", "cpu"], default=None,
                   help="gpu: Transformer Engine kernels assumed (default for bf16/fp16 configs); cpu: local spec")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="memory per rank in GiB (default on gpu: this machine's GPU, else 79.6 = an H100 80GB; "
                        "on cpu: available host memory / world size)")
    p.add_argument("--overhead-gib", type=float, default=None, help="fixed allowance per rank (gpu 4, cpu 0.5)")
    p.add_argument("--no-fake-groups", action="store_true", help="skip Megatron's parallel_state on a fake world")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for `megatron-pz train`")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from megatron_pz.bench.validate import validate

    if args.world_size < 1:
        raise ConfigError("--world-size must be >= 1")
    report = validate(args.config, args.overrides, args.world_size, model=args.model, target=args.target,
                      memory_gib=args.memory_gib, overhead_gib=args.overhead_gib, fake_groups=not args.no_fake_groups)
    print(f"megatron-pz bench plan: {args.config} on {args.world_size} rank(s)")
    print(report.text())
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------------------- scaling
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


def _register_scaling(kinds: argparse._SubParsersAction) -> None:
    from megatron_pz.bench import scaling

    p = kinds.add_parser("scaling", help="sweep TP x PP x DP (x CP x EP, micro-batch, recompute): CSV + PNG",
                         description=scaling.__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=scaling.__doc__)
    m = p.add_argument_group("model and workload (defaults from --config when given)")
    m.add_argument("--config", default=None, help="run file: model (policy.load), micro-batch, lengths, dtype, "
                                                  "recompute, layout and global batch")
    m.add_argument("--model", default=None, help="preset (tiny, qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b, "
                                                 "qwen3-30b-a3b, ...), 'smollm2', HF folder, or checkpoint")
    m.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default 512)")
    m.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (not in the loss; default 1/4)")
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
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
    p.set_defaults(func=_scaling)


def _spec_from_args(args: argparse.Namespace):
    from megatron_pz import device
    from megatron_pz.bench import archs, scaling
    from megatron_pz.bench.validate import host_memory_gib

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
        from megatron_pz.bench.validate import H100_GIB

        memory = H100_GIB
    else:
        memory = host_memory_gib() / max(world or max(t * p * c * dp for t in d["tp"] for p in d["pp"]
                                                      for c in d["cp"] for dp in d["dp"]), 1)
    return scaling.SweepSpec(
        arch=arch, model=str(d["model"]), tp=d["tp"], pp=d["pp"], dp=d["dp"], cp=d["cp"], ep=d["ep"],
        micro_batch_size=d["mbs"], recompute=d["recompute"], world_size=world, global_batch=d["global_batch"],
        num_microbatches=args.num_microbatches or 4, seq_length=d["seq_length"],
        prompt_length=d["prompt_length"] or d["seq_length"] // 4, dtype=d["dtype"],
        sequence_parallel=d["sequence_parallel"], distributed_optimizer=d["distributed_optimizer"],
        steps=args.steps, warmup=args.warmup, gpu_memory_gib=memory,
        overhead_gib=args.overhead_gib if args.overhead_gib is not None else (4.0 if on_gpu else 0.5),
        on_gpu=on_gpu)


def _scaling(args: argparse.Namespace) -> int:
    import json

    from megatron_pz.bench import plot, scaling

    out = Path(args.out)
    if args.report:
        if not (out / "sweep.json").exists():
            raise UserError(f"{out}/sweep.json not found: run the sweep (or --points-only) into --out first")
    else:
        spec = _spec_from_args(args)
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps must be >= 1 and --warmup >= 0")
        rows = scaling.write_points(spec, out)
        sweep = json.loads((out / "sweep.json").read_text())
        sweep["spec"]["peak_tflops"] = args.peak_tflops
        (out / "sweep.json").write_text(json.dumps(sweep, indent=1, default=str))
        _print_plan(rows, spec)
        if args.points_only:
            print(f"wrote {sum(r['status'] == 'planned' for r in rows)} point(s) to {out}/points")
            return 0
        if not args.dry_run:
            threads = None if spec.on_gpu else (args.threads or os.cpu_count())
            scaling.run_points(out, rows, threads, args.timeout)
    rows = scaling.collect(out)
    scaling.write_csv(rows, out / "scaling.csv")
    sweep = json.loads((out / "sweep.json").read_text())
    s = sweep["spec"]
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


KINDS = [_register_compare, _register_scaling, _register_plan]
