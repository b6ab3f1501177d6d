"""The ``megatron-pz serve-rollout`` subcommand: run the embedded engine as an SGLang-compatible HTTP server.

    megatron-pz serve-rollout --model PATH [--port 30000] [--host 127.0.0.1] [--api-key KEY]
                              [--weights-dir DIR] [--max-batch-size 64] [--dtype float32]
                              [--max-n 256] [--max-prompt-chars N] [--max-prompt-tokens N] [--max-body-bytes N]

PATH is an HF folder (config.json + safetensors) or a Megatron checkpoint folder (it contains
``latest_checkpointed_iteration.txt``), which is converted to HF once into a cache folder first.
"""
from __future__ import annotations

import argparse
import hashlib
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
from megatron_pz.io import atomic_replace
from megatron_pz.rollout.launcher import API_KEY_ENV

logger = logging.getLogger(__name__)

_MCORE_MARKER = "latest_checkpointed_iteration.txt"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve-rollout", help="serve the embedded rollout engine over SGLang's HTTP API",
                              description=__doc__.splitlines()[0])
    # Model
    p.add_argument("--model", required=True, help="HF model folder, or a Megatron checkpoint folder (converted)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16, or fp32 | bf16 | fp16 "
                                                        "(float32 on CPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--weight-version", type=int, default=0, help="version of the initial weights")
    p.add_argument("--cache-dir", default=".cache/rollout",
                   help="where a Megatron checkpoint is converted to HF (one subfolder per checkpoint)")
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


def resolve_model(path: str, cache_dir: str) -> str:
    """An HF folder as is; a Megatron checkpoint converted (once) to an HF folder under ``cache_dir``."""
    src = Path(path)
    if not src.exists():
        raise UserError(f"--model {path}: no such file or directory")
    if not (src / _MCORE_MARKER).is_file():
        return str(src)
    iteration = (src / _MCORE_MARKER).read_text().strip()
    key = hashlib.sha1(f"{src.resolve()}@{iteration}".encode()).hexdigest()[:12]
    dst = Path(cache_dir) / f"hf-from-mcore-{key}"
    if (dst / "config.json").is_file():
        logger.info("using converted checkpoint %s", dst)
        return str(dst)
    try:
        from megatron_pz.convert import mcore_to_hf
    except ImportError as exc:
        raise UserError(f"--model {path} is a Megatron checkpoint, but megatron_pz.convert.mcore_to_hf is not "
                        f"available ({exc}); convert it to an HF folder first and pass that") from None
    logger.info("converting Megatron checkpoint %s (iteration %s) to HF in %s", src, iteration, dst)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    mcore_to_hf(str(src), str(tmp))
    atomic_replace(tmp, dst)  # a crash mid-conversion never leaves a half folder under the final name
    return str(dst)


def main(args: argparse.Namespace) -> int:
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
    engine = EmbeddedEngine(resolve_model(args.model, args.cache_dir), dtype=args.dtype, device=args.device,
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
