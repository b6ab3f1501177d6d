"""``megatron-pz eval``: evaluate a policy (HF folder, SmolLM2, Megatron checkpoint or training run) on suites.

Generation goes through the rollout interface: the in-process embedded engine by default, or running SGLang
servers with ``--url``. Writes ``<out>/eval_<suite>.json`` and ``<out>/eval_report.md`` and prints the table.
``--harness TASKS`` runs lm-evaluation-harness tasks too (``harness_cli.py``), into ``<out>/harness.json``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from megatron_pz.dtypes import SHORT_NAMES
from megatron_pz.eval import harness_cli


def register(sub: argparse._SubParsersAction) -> None:
    from megatron_pz.eval.suites import SUITES

    p = sub.add_parser("eval", help="evaluate a policy on held-out span / maths / multiple-choice suites",
                       description=__doc__.splitlines()[0],
                       epilog="suites: " + ", ".join(f"{n} ({s.description})" for n, s in SUITES.items()))
    p.add_argument("--load", required=True,
                   help="HF model folder | 'smollm2' | Megatron checkpoint root or iter_NNNNNNN folder | a "
                        "training run's output dir (its checkpoints/), as every command takes a model; a "
                        "checkpoint is exported to HF once (cached); with --url: only the tokenizer is read")
    p.add_argument("--suite", default=None, help="suite name(s), comma-separated (--suite and/or --harness)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per suite / documents per harness task (default: all items of the data)")
    p.add_argument("--samples", type=int, default=None, help="k samples per item for mean@k (default: per suite)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0 for k=1, 0.6 for k>1)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: 1 greedy, 0.95 sampled)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response cap (default: per suite)")
    p.add_argument("--data", action="append", default=[], metavar="[SUITE=]PATH",
                   help="data file for a suite (SUITE=PATH; a bare PATH applies when one suite is given); "
                        "repeatable")
    p.add_argument("--prompt-style", choices=["chat", "plain"], default="chat",
                   help="chat: one user turn in the tokenizer's chat template; plain: raw text (base models)")
    p.add_argument("--restate", action="store_true",
                   help="span suites: restated prompt, answer by continuation (a run's prompt.pred_restate)")
    p.add_argument("--cloze", action="store_true",
                   help="with --restate: the restated prompt as plain text (a run's prompt.pred_cloze)")
    p.add_argument("--url", nargs="+", default=None, help="SGLang / embedded server URL(s) instead of in-process")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--out", default=None, help="report folder (default: runs/eval/<model name>)")
    p.add_argument("--seed", type=int, default=0, help="picks items, span masks and the sampling seed")
    p.add_argument("--dtype", choices=SHORT_NAMES, default="fp32", help="embedded engine weights dtype")
    p.add_argument("--device", default=None, help="embedded engine device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="embedded engine: sequences per forward batch; --harness: prompts per request")
    harness_cli.add_arguments(p)
    p.set_defaults(func=run)


def parse_data_args(values: list[str], suites: list[str]) -> dict[str, str]:
    from megatron_pz.errors import ConfigError
    from megatron_pz.eval.suites import SUITES

    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name in SUITES:
            out[name] = path
        elif len(suites) == 1:
            out[suites[0]] = v
        else:
            raise ConfigError(f"--data {v}: with several suites write --data SUITE=PATH")
    for name in out:
        if name not in suites:
            raise ConfigError(f"--data {name}=...: suite {name!r} is not among --suite {','.join(suites)}")
    return out


def _validate(args: argparse.Namespace) -> None:
    from megatron_pz.errors import ConfigError

    for name in ("limit", "samples", "max_new_tokens", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.temperature is not None and not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.cloze and not args.restate:
        raise ConfigError("--cloze renders the restated prompt as plain text: add --restate")
    if args.suite is None and args.harness is None:
        raise ConfigError("nothing to evaluate: give --suite NAMES and/or --harness TASKS")


def run(args: argparse.Namespace) -> int:
    from megatron_pz.convert.source import hf_model
    from megatron_pz.errors import ConfigError
    from megatron_pz.eval.report import text_table, write_reports
    from megatron_pz.eval.runner import run_suite
    from megatron_pz.eval.suites import default_data_path, get_suite, parse_suites
    from megatron_pz.model.tokenizer import load_tokenizer

    t_start = time.perf_counter()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _validate(args)
    harness_tasks = harness_cli.validate(args)
    suites = parse_suites(args.suite) if args.suite is not None else []
    data = parse_data_args(args.data, suites)
    for s in suites:  # fail on missing data before loading any model
        p = Path(data[s]) if s in data else default_data_path(s)
        if not p.exists():
            raise ConfigError(f"--data for suite {s!r}: {p} does not exist")
        if get_suite(s).sample is None and s not in data:
            raise ConfigError(f"suite {s!r} ships no data; pass --data {s}=PATH")

    model = hf_model(args.load, export=not args.url, dtype=args.dtype, tokenizer=args.tokenizer)
    hf_dir = model.hf_dir
    tok = load_tokenizer(model.tokenizer)
    chat_template = None
    if args.prompt_style == "chat" and tok.apply_chat_template([{"role": "user", "content": "x"}]) is not None:
        chat_template = tok.apply_chat_template

    if args.url:
        from megatron_pz.rollout.launcher import API_KEY_ENV
        from megatron_pz.rollout.pool import RolloutPool
        from megatron_pz.rollout.sglang_client import ClientConfig, SGLangClient

        client = ClientConfig(api_key=os.environ.get(API_KEY_ENV) or None)
        engine = SGLangClient(args.url[0], client) if len(args.url) == 1 else RolloutPool(args.url,
                                                                                         client_config=client)
        if not engine.health():
            raise ConfigError(f"--url {' '.join(args.url)}: server not healthy / unreachable")
        model_desc = f"{args.load} via {' '.join(args.url)}"
    else:
        import torch

        from megatron_pz.dtypes import long_name
        from megatron_pz.engine.engine import EmbeddedEngine

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine = EmbeddedEngine(hf_dir, dtype=long_name(args.dtype), device=device, max_batch_size=args.batch_size)
        model_desc = str(args.load)

    name = Path(str(args.load).rstrip("/")).name or "model"
    out = Path(args.out) if args.out else Path("runs") / "eval" / name
    results = []
    header = {"model": model_desc, "hf_folder": str(hf_dir) if hf_dir else "(server)",
              "engine": "sglang" if args.url else f"embedded ({args.dtype})",
              "command": "megatron-pz eval " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "megatron-pz eval"}
    for s in suites:
        res = run_suite(engine, tok.encode, chat_template, s, limit=args.limit, samples=args.samples,
                        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, data_path=data.get(s), prompt_style=args.prompt_style,
                        restate=args.restate, cloze=args.cloze)
        results.append(res)
        # Written after every suite, so an interrupted run keeps the suites it finished.
        header["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        report = write_reports(results, out, header)
    if results:
        wall = time.perf_counter() - t_start
        print(text_table(results))
        print(f"wrote {report} and {len(results)} eval_<suite>.json in {wall:.0f}s")
    if harness_tasks:
        harness_cli.run(args, harness_tasks, model.tokenizer, None if args.url else engine, out, model_desc)
    return 0


if os.environ.get("MEGATRON_PZ_EVAL_DEBUG"):  # pragma: no cover
    logging.basicConfig(level=logging.DEBUG)
