"""``megatron-pz eval --harness TASKS``: lm-evaluation-harness tasks, on ``--url`` or on an embedded server started
in-process for the run (a free loopback port, a generated API key, stopped after). Writes ``<out>/harness.json``
and prints the table; the evaluation itself is ``harness.run_harness``."""
from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harness", default=None, metavar="TASKS",
                   help="lm-evaluation-harness task(s), comma-separated (shipped: pz_wiki_lastword); with --url "
                        "on that server's /v1/completions, else on an embedded server started for the run")
    p.add_argument("--harness-include", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAMLs (repeatable; megatron_pz/assets/harness is always included)")
    p.add_argument("--harness-fewshot", type=int, default=None, metavar="N",
                   help="--harness: few-shot examples per prompt (default: each task's own)")


def validate(args: argparse.Namespace) -> list[str]:
    """The task names, checked (with the include folders) before any model is loaded; ConfigError otherwise."""
    from megatron_pz.errors import ConfigError
    from megatron_pz.eval.harness import HARNESS_ENV, parse_tasks, task_manager

    if args.harness_fewshot is not None and args.harness_fewshot < 0:
        raise ConfigError(f"--harness-fewshot must be >= 0, got {args.harness_fewshot}")
    if args.harness is None:
        if args.harness_include or args.harness_fewshot is not None:
            raise ConfigError("--harness-include / --harness-fewshot need --harness TASKS")
        return []
    # Before the hub libraries are imported: they read the offline flags once.
    os.environ.update(HARNESS_ENV)
    tasks = parse_tasks(args.harness)
    task_manager(tasks, args.harness_include)
    return tasks


def run(args: argparse.Namespace, tasks: list[str], tok_dir: Path, engine: Any | None, out: Path,
        model_desc: str) -> Path:
    """Run ``tasks``; ``engine``: the in-process ``EmbeddedEngine`` to serve (None with ``--url``)."""
    from megatron_pz.eval.harness import run_harness, text_table, write_report
    from megatron_pz.rollout.launcher import API_KEY_ENV

    common = dict(include=args.harness_include, limit=args.limit, num_fewshot=args.harness_fewshot,
                  seed=args.seed, batch_size=args.batch_size, max_gen_toks=args.max_new_tokens or 256)
    if args.url:
        url = args.url[0]
        result = run_harness(url, tasks, tok_dir, api_key=os.environ.get(API_KEY_ENV) or None, **common)
    else:
        from megatron_pz.engine.server import RolloutServer, ServerConfig

        server = RolloutServer(engine, ServerConfig(host="127.0.0.1", port=0, api_key=secrets.token_urlsafe(24)))
        url = "embedded (in-process)"
        try:
            result = run_harness(server.start().url, tasks, tok_dir, api_key=server.config.api_key, **common)
        finally:
            server.stop()
    header = {"model": model_desc, "server": url, "tokenizer": str(tok_dir), "tasks": tasks,
              "include": [str(p) for p in args.harness_include], "limit": args.limit,
              "num_fewshot": args.harness_fewshot, "seed": args.seed, "batch_size": args.batch_size,
              "command": "megatron-pz eval " + " ".join(sys.argv[2:])}
    path = write_report(result, out, header)
    print(text_table(result))
    print(f"wrote {path} in {result.seconds:.0f}s")
    return path
