"""``megatron-pz plan --config RUN.yaml --world-size N [--model PRESET]``: the pre-flight dry run of a run config."""
from __future__ import annotations

import argparse

from megatron_pz.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    from megatron_pz.plan import dry_run

    p = sub.add_parser("plan", help="dry-run: validate a run config for a world size and predict memory per GPU",
                       description=dry_run.__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=dry_run.__doc__)
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every check and the verdict; exit code 0 when the config will run, 1 when not."""
    from megatron_pz.plan.dry_run import validate

    if args.world_size < 1:
        raise ConfigError("--world-size must be >= 1")
    report = validate(args.config, args.overrides, args.world_size, model=args.model, target=args.target,
                      memory_gib=args.memory_gib, overhead_gib=args.overhead_gib, fake_groups=not args.no_fake_groups)
    print(f"megatron-pz plan: {args.config} on {args.world_size} rank(s)")
    print(report.text())
    return 0 if report.ok else 1
