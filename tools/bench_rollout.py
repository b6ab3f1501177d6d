#!/usr/bin/env python3
"""Benchmark the embedded rollout engine against plain ``transformers`` generate, and disk weight sync.

    python tools/bench_rollout.py --model ~/.cache/megatron_pz/smollm2-135m-instruct/hf
    python tools/bench_rollout.py --quick            # tiny random model, small sizes: a smoke run

Throughput: the same prompts (Wikipedia paragraphs cut to --prompt-len tokens, or random ids) at each batch size,
sampling at temperature 1 with EOS ignored so every row generates exactly --max-new-tokens tokens, for
  * HF generate:        model.generate(...) on the left-padded batch, no logprobs;
  * embedded:           EmbeddedEngine.generate in-process (generate + per-token logprobs + stop handling);
  * embedded over HTTP: the same engine behind RolloutServer, driven by RolloutPool (one request per prompt,
                        merged again by the server's batching window): what CI and a laptop run.
Weight sync: DiskWeightSync through the HTTP server (write safetensors shards, POST /update_weights_from_disk, the
server reads + validates + swaps), reported as seconds per 100M parameters. Figures only: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/tiny_llama.py, the tests' tiny model

from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.rollout.pool import PoolConfig, RolloutPool
from megatron_pz.rollout.protocol import SamplingParams
from megatron_pz.engine.server import RolloutServer, ServerConfig
from megatron_pz.rollout.sglang_client import ClientConfig
from megatron_pz.weight_sync import DiskWeightSync
from tiny_llama import make_tiny_llama

WIKI = Path("/work/shared/data/wiki/valid.jsonl")


def make_prompts(engine: EmbeddedEngine, count: int, prompt_len: int, seed: int) -> list[list[int]]:
    """``count`` prompts of exactly ``prompt_len`` tokens (equal lengths: padding does not skew the comparison)."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    if engine.tokenizer is not None and WIKI.is_file():
        for line in WIKI.read_text().splitlines():
            ids = engine.tokenizer(json.loads(line)["text"]).input_ids
            if len(ids) >= prompt_len:
                prompts.append(ids[:prompt_len])
            if len(prompts) == count:
                return prompts
    while len(prompts) < count:
        prompts.append([rng.randrange(engine.vocab_size) for _ in range(prompt_len)])
    return prompts


def time_hf_generate(engine: EmbeddedEngine, prompts: list[list[int]], max_new: int) -> float:
    from transformers import GenerationConfig

    ids = torch.tensor(prompts)
    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           pad_token_id=engine.pad_token_id, eos_token_id=None)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + max_new
    return elapsed


def time_engine(gen, prompts: list[list[int]], max_new: int) -> float:
    params = SamplingParams(n=1, max_new_tokens=max_new, temperature=1.0, ignore_eos=True)
    t0 = time.perf_counter()
    out = gen(prompts, params)
    elapsed = time.perf_counter() - t0
    assert sum(len(r.response_ids) for g in out for r in g) == len(prompts) * max_new
    return elapsed


def best_of(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model folder (default: a tiny random Llama)")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="best of N timings per cell")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sync-repeats", type=int, default=2, help="disk weight-sync pushes to time")
    p.add_argument("--no-http", action="store_true", help="skip the over-HTTP column")
    p.add_argument("--quick", action="store_true", help="tiny model, batch sizes 1,8, 16 new tokens, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.batch_sizes, args.max_new_tokens, args.repeats, args.prompt_len = "1,8", 16, 1, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model_path = args.model or str(make_tiny_llama(tmp / "tiny"))

    engine = EmbeddedEngine(model_path, dtype=args.dtype, max_batch_size=max(batch_sizes))
    n_params = sum(p.numel() for p in engine.model.parameters())
    prompts = make_prompts(engine, max(batch_sizes), args.prompt_len, seed=0)
    server = pool = None
    if not args.no_http:
        server = RolloutServer(engine, ServerConfig(port=0, weights_dir=str(tmp))).start()
        pool = RolloutPool([server.url], PoolConfig(max_concurrency_per_server=max(batch_sizes)),
                           client_config=ClientConfig(generate_timeout_s=3600))
    # Warm-up (first-call allocations, lazy imports) for every path.
    time_hf_generate(engine, prompts[:2], 2)
    time_engine(engine.generate, prompts[:2], 2)
    if pool:
        time_engine(pool.generate, prompts[:2], 2)

    print(f"model {model_path}: {n_params / 1e6:.1f}M params, {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_len} tok, {args.max_new_tokens} new tok/row, best of {args.repeats}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    header = f"{'batch':>5} | {'HF generate tok/s':>17} | {'embedded tok/s':>14} | {'emb/HF':>6}"
    header += "" if args.no_http else f" | {'emb over HTTP tok/s':>19} | {'HTTP/HF':>7}"
    print(header)
    print("-" * len(header))
    for bs in batch_sizes:
        batch = prompts[:bs]
        tokens = bs * args.max_new_tokens
        hf = tokens / best_of(lambda b=batch: time_hf_generate(engine, b, args.max_new_tokens), args.repeats)
        emb = tokens / best_of(lambda b=batch: time_engine(engine.generate, b, args.max_new_tokens), args.repeats)
        row = f"{bs:>5} | {hf:>17.1f} | {emb:>14.1f} | {emb / hf:>6.2f}"
        if pool:
            http = tokens / best_of(lambda b=batch: time_engine(pool.generate, b, args.max_new_tokens), args.repeats)
            row += f" | {http:>19.1f} | {http / hf:>7.2f}"
        print(row, flush=True)

    # Disk weight sync through the server: the trainer's full state -> shards -> POST -> read/validate/swap.
    if server:
        state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()
                 if k != "lm_head.weight" or not engine.model.config.tie_word_embeddings}
        sync = DiskWeightSync(pool, tmp / "weights", keep_last=1, current_version=0)
        times = []
        for v in range(1, args.sync_repeats + 1):
            report = sync.push(state.items(), v)
            times.append(report.seconds_per_100m_params)
        print(f"\ndisk weight sync ({report.num_params / 1e6:.1f}M params, {report.num_bytes / 1e6:.0f} MB, "
              f"{report.num_buckets} shard(s)): {min(times):.2f} s per 100M params (best of {len(times)}; "
              f"write + POST + server read/validate/swap)")
        pool.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
