"""``megatron-pz train --config FILE [key=value ...]`` or ``megatron-pz train --load CKPT --tokenizer DIR``
(or ``torchrun -m megatron_pz.train ...``): the command line of the step loop (``train.py``).

Arguments become one typed config (``config.load_config``; Megatron-LM flags are the same keys), a staged run file
runs its stages (``trainer/stages.py``), the console is set up for people (``logs.configure_console``), and a
rollout failure that outlived every retry ends in two lines and exit status 3. Library output (warnings, progress
bars) is held from the start, before the config names the log file, and goes there (``logs.library_output``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_pz.config import FLAGS, flag_overrides, load_config, read_yaml
from megatron_pz.errors import ConfigError, RolloutError, UserError
from megatron_pz.logs import configure_console, say
from megatron_pz.logs.library_output import console_stream, hold, release
from megatron_pz.trainer.stages import is_staged, run_stages

ROLLOUT_FAILED_EXIT = 3
"""Exit status when the rollout servers failed for good (2 is bad input, 1 a bug)."""

DESCRIPTION = "run PretrainZero training: the step loop on a Megatron-Core policy, resuming from " \
              "<output_dir>/checkpoints"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run PretrainZero training (resumes from <output_dir>/checkpoints)",
                       description=DESCRIPTION)
    _add_args(p)
    p.set_defaults(func=lambda a: main_from_args(a))


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run file (YAML), e.g. examples/quickstart_cpu.yaml; without it, the paper's "
                   "defaults (megatron_pz/config/) and --load")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=10 optim.lr=1e-6")
    megatron = p.add_argument_group("Megatron-LM flags", "each sets one config key, the same as KEY=VALUE; "
                                    "continue from a checkpoint with: --load CKPT --tokenizer DIR --save OUT")
    for flag in FLAGS:
        megatron.add_argument(*flag.names, dest=flag.dest, metavar=flag.metavar,
                              help=f"= {flag.key}: {flag.help}")


def main_from_args(args: argparse.Namespace) -> int:
    hold()  # a warning raised while the config is read (a reward plug-in's import) waits for the log file
    try:
        return _main(args)
    finally:
        release()  # the console back for the command's error line or traceback


def _main(args: argparse.Namespace) -> int:
    flags = flag_overrides(vars(args), args.overrides)
    if args.config is None and not any(o.startswith("policy.load=") for o in [*flags, *args.overrides]):
        raise ConfigError("give a run file (--config FILE) or the weights to start from (--load CKPT or "
                          "policy.load=...); nothing else is needed for the paper's defaults")
    if args.config is not None:
        data = read_yaml(Path(args.config))
        if is_staged(data):
            return run_stages(Path(args.config), data, [*flags, *args.overrides])
    cfg = load_config(args.config, [*flags, *args.overrides])
    # The console is for people: library chatter goes to the run's log file, rank 0 prints the set-up, one line
    # per step and the progress bar; other ranks print only errors. RANK/WORLD_SIZE: torchrun's (1 process else).
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    log_path = configure_console(cfg.output_dir, rank)
    if rank == 0:
        for line in cfg.describe(world_size):
            say(line)
        say(f"output   {cfg.output_dir} (metrics.jsonl, tensorboard/, checkpoints/; details in {log_path.name})")
    # Megatron-Core warns while it is imported: only now, with the console set up, do those lines go to train.log.
    from megatron_pz.train import train

    try:
        train(cfg)
    except RolloutError as exc:
        # A server that died (after the client's retries and the pool's fail-over) is not a bug of ours: name it
        # in one line and say how to continue. The step in flight is lost, nothing saved is: checkpoints are
        # written atomically, and the same command resumes from the last one.
        print(f"megatron-pz train: rollout error: {exc}", file=console_stream())
        print(f"megatron-pz train: nothing saved is lost: bring the rollout server(s) back and rerun the same "
              f"command to resume from {cfg.output_dir}/checkpoints", file=console_stream())
        return ROLLOUT_FAILED_EXIT
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_pz.train`` / ``torchrun -m megatron_pz.train``."""
    p = argparse.ArgumentParser(prog="megatron_pz.train", description=DESCRIPTION)
    _add_args(p)
    try:
        return main_from_args(p.parse_intermixed_args(argv))
    except UserError as exc:
        print(f"megatron_pz.train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
