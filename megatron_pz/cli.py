"""The ``megatron-pz`` console command: one subcommand per capability.

Each subcommand lives next to the code it drives, in a module exposing ``register(subparsers)``; that
function adds its parser and sets ``func`` (called with the parsed namespace, returns an exit code).
Modules are imported lazily so that ``megatron-pz --help`` does not import Megatron or torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from megatron_pz.errors import RolloutError, UserError

# (subcommand, module providing register(subparsers)). Order = order in --help.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("convert", "megatron_pz.convert.cli"),
    ("serve-rollout", "megatron_pz.engine.serve"),
    ("train", "megatron_pz.train_cli"),
    ("eval", "megatron_pz.eval.cli"),
    ("heldout", "megatron_pz.eval.heldout_cli"),
    ("plan", "megatron_pz.plan.cli"),
    ("scaling", "megatron_pz.scaling.cli"),
]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-pz", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, module in SUBCOMMANDS:
        if wanted is not None and wanted != name:
            # Only the chosen subcommand's module is imported (keeps start-up fast).
            sub.add_parser(name)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue  # not built yet in this version of the package
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    # key=value overrides may come before, between or after flags (`train --config F a=1 --load X b=2`); argparse
    # takes one run of positionals only, so the rest arrive as extras and join the overrides in order.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if any(a.startswith("-") for a in extra) or not isinstance(getattr(args, "overrides", None), list):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"megatron-pz {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RolloutError as exc:  # the servers failed for good; the message names URL and endpoint
        print(f"megatron-pz {args.command}: rollout error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
