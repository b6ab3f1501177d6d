"""The ``megatron-pz serve-rollout`` subcommand: run the embedded engine as an SGLang-compatible HTTP server.

    megatron-pz serve-rollout --model SOURCE [--port 30000] [--host 127.0.0.1] [--api-key KEY]
                              [--weights-dir DIR] [--max-batch-size 64] [--dtype float32]
                              [--max-n 256] [--max-prompt-chars N] [--max-prompt-tokens N] [--max-body-bytes N]

SOURCE is any model source the other commands take (``convert.source``): ``smollm2``, an HF folder, a Megatron
checkpoint root or ``iter_NNNNNNN`` folder, or a training run's folder. A checkpoint is exported to HF once, in a
child process, into the shared cache (``<cache>/hf_export``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from megatron_pz.engine.limits import (
    BODY_TIMEOUT_S,
    DEFAULT_MAX_N,
    DEFAULT_MAX_PROMPT_CHARS,
    MAX_BODY_BYTES,
)
from megatron_pz.errors import UserError
from megatron_pz.rollout.launcher import API_KEY_ENV

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve-rollout", help="serve the embedded rollout engine over SGLang's HTTP API",
                              description=__doc__.splitlines()[0])
    # Model
    p.add_argument("--model", required=True,
                   help="'smollm2' | HF model folder | Megatron checkpoint root or iter_NNNNNNN folder | a training "
                        "run's output dir (its checkpoints/), as every command takes a model; a checkpoint is "
                        "exported to HF once (cached)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a checkpoint that carries none")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16, or fp32 | bf16 | fp16 "
                                                        "(float32 on CPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--weight-version", type=int, default=0, help="version of the initial weights")
    # Network and safety
    p.add_argument("--host", default="127.0.0.1", help="bind address; non-loopback requires an API key")
    p.add_argument("--port", type=int, default=30000, help="TCP port (0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; SGLang's --api-key)")
    p.add_argument("--weights-dir", default=None,
                   help="/update_weights_from_disk only reads folders below this one (unset = disk updates off)")
    # Request limits (docs/rollout.md, "Server limits and errors")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies answer 413")
    p.add_argument("--body-timeout-s", type=float, default=BODY_TIMEOUT_S,
                   help="a body not complete this long after the request started answers 408")
    p.add_argument("--max-n", type=int, default=DEFAULT_MAX_N, help="largest sampling_params.n per request")
    p.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS,
                   help="longest text prompt in characters, checked before tokenising")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens (default: the model's max_position_embeddings)")
    # Batching
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences (prompts x n) per engine call")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="wait this long to merge concurrent requests")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING")
    p.set_defaults(func=main)


def resolve_model(source: str, tokenizer: str | None = None) -> str:
    """The HF folder to serve for ``--model`` (``convert.source.hf_model``; a checkpoint exported once)."""
    from megatron_pz.convert.source import hf_model

    return str(hf_model(source, what="--model", tokenizer=tokenizer).hf_dir)


def main(args: argparse.Namespace) -> int:
    # Before torch loads its OpenMP runtime: idle OpenMP workers sleep instead of spinning. With spinning workers on
    # every core, the event loop that reads requests and answers them got no CPU between engine calls: 64 clients at
    # once waited ~100 s for 2-token answers on 2 cores (docs/rollout.md, "Many trainers on one server").
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.server import RolloutServer, ServerConfig, is_loopback

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Fail on the cheap checks before spending time loading the model.
    if not is_loopback(args.host) and not args.api_key:
        raise UserError(f"refusing to serve on non-loopback address {args.host!r} without an API key: pass "
                        f"--api-key (or set {API_KEY_ENV}), or bind 127.0.0.1")
    if args.weights_dir and not Path(args.weights_dir).is_dir():
        raise UserError(f"--weights-dir {args.weights_dir} is not a directory")
    engine = EmbeddedEngine(resolve_model(args.model, args.tokenizer), dtype=args.dtype, device=args.device,
                            weight_version=args.weight_version, max_batch_size=args.max_batch_size,
                            num_threads=args.threads)
    server = RolloutServer(engine, ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                                                weights_dir=args.weights_dir,
                                                batch_window_s=args.batch_window_ms / 1000.0,
                                                max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout_s,
                                                max_n=args.max_n, max_prompt_chars=args.max_prompt_chars,
                                                max_prompt_tokens=args.max_prompt_tokens))

    def _shutdown(signum, frame):  # SIGTERM from the launcher / Slurm / PDEATHSIG: stop accepting, exit cleanly
        logger.info("signal %d: shutting down", signum)
        server.shutdown()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    # Slurm's pre-time-limit SIGUSR1 reaches every process of a job step; it is the trainer's cue to
    # checkpoint, and must not take the rollout server down.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    print(f"serve-rollout: listening on {server.url}", flush=True)
    server.serve_forever()
    logger.info("server stopped")
    return 0
