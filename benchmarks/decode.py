"""``python -m benchmarks.decode [--reps N] [--threads T]``: rollout tokens/s of the embedded engine's decode paths.

SmolLM2-135M-Instruct, fp32, on two workloads of real prompts (``benchmarks.workload.build_workload``):

* "bench": the 4 prediction prompts of step 1 of ``examples/bench_cpu.yaml`` (102-141 tokens) x 4 samples,
  48 new tokens, T = 1 (the ``benchmarks.compare`` workload's rollout);
* "pretrainzero": the 4 longest prompts of 3 steps of the same file with paragraphs of 200-512 tokens
  (prompts of ~280-380 tokens) x 8 samples, 32 new tokens: prediction groups whose prompts are several times
  longer than their answers.

Arms, interleaved within each repetition (A/B/C, then again), after one warm-up each:

* ``generate``: plain ``transformers`` ``model.generate`` on the left-padded prompts with
  ``num_return_sequences = n``, T = 1, no logprobs (what a trainer without an engine would run);
* ``old``: ``EmbeddedEngine.generate`` with transformers' ``DynamicCache`` (``preallocated_kv=False``);
* ``new``: ``EmbeddedEngine.generate`` with the KV cache written in place (``engine/decode.py``, the default).

Every row generates exactly ``max_new_tokens`` (EOS ignored), seeded as the trainer seeds rollouts. Prints wall
and CPU seconds per repetition, medians, tokens/s and the ratios; checks that old and new return the same tokens
and prints the largest log-prob difference. Figures only: nothing about speed is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

WORKLOADS = {  # name -> (overrides of examples/bench_cpu.yaml, steps built, prompts taken, n, max_new_tokens)
    "bench": ([], 2, "step1", 4, 48),
    "pretrainzero": (["corpus.max_prompt_tokens=512", "corpus.min_paragraph_tokens=200"], 3, "longest4", 8, 32),
}


def prompts_of(name: str) -> list[list[int]]:
    from benchmarks.workload import build_workload
    from megatron_pz.config import load_config

    overrides, steps, take, _, _ = WORKLOADS[name]
    work = build_workload(load_config("examples/bench_cpu.yaml", ["train.objective=random_span", *overrides]), steps)
    if take == "step1":
        return [p.ids for p in work.steps[1].prompts]
    return sorted((p.ids for s in work.steps for p in s.prompts), key=len)[-4:]


def run_generate(engine, prompts: list[list[int]], n: int, max_new: int) -> int:
    from transformers import GenerationConfig

    from megatron_pz.engine.generation import left_pad

    ids, mask = left_pad(prompts, engine.pad_token_id)
    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           num_return_sequences=n, pad_token_id=engine.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        out = engine.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    return out.shape[0] * (out.shape[1] - ids.shape[1])


def run_engine(engine, prompts: list[list[int]], n: int, max_new: int, preallocated: bool, keep: dict) -> int:
    from megatron_pz.rollout.protocol import SamplingParams

    engine.preallocated_kv = preallocated
    out = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new, ignore_eos=True, seed=1234))
    keep[preallocated] = [r for group in out for r in group]
    return sum(len(r.response_ids) for r in keep[preallocated])


def main(argv: list[str]) -> None:
    from megatron_pz.convert.smollm2 import prepare_smollm2
    from megatron_pz.engine.engine import EmbeddedEngine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workloads", default="bench,pretrainzero")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_dir, _ = prepare_smollm2()
    engine = EmbeddedEngine(hf_dir, max_batch_size=64)
    print(f"SmolLM2-135M-Instruct fp32, torch threads {torch.get_num_threads()}, {args.reps} repetitions")
    for name in args.workloads.split(","):
        prompts = prompts_of(name)
        _, _, _, n, max_new = WORKLOADS[name]
        keep: dict = {}
        arms = {"generate": lambda: run_generate(engine, prompts, n, max_new),
                "old": lambda: run_engine(engine, prompts, n, max_new, False, keep),
                "new": lambda: run_engine(engine, prompts, n, max_new, True, keep)}
        for run in arms.values():  # warm-up
            run()
        wall: dict[str, list[float]] = {k: [] for k in arms}
        cpu: dict[str, list[float]] = {k: [] for k in arms}
        loads = [os.getloadavg()[0]]
        tokens = 0
        for _ in range(args.reps):
            for k, run in arms.items():
                t, c = time.perf_counter(), time.process_time()
                tokens = run()
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
                loads.append(os.getloadavg()[0])
        old, new = keep[False], keep[True]
        same = all(a.response_ids == b.response_ids for a, b in zip(old, new))
        dlp = max(abs(x - y) for a, b in zip(old, new) for x, y in zip(a.logprobs, b.logprobs))
        print(f"\n{name}: {len(prompts)} prompts of {sorted(len(q) for q in prompts)} tokens x {n} samples, "
              f"{max_new} new tokens ({tokens} tokens per run); load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
        med = {k: statistics.median(v) for k, v in wall.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        for k in arms:
            print(f"  {k:9s} wall {', '.join(f'{x:.2f}' for x in wall[k])} s (median {med[k]:.2f}: "
                  f"{tokens / med[k]:.1f} tok/s); CPU {', '.join(f'{x:.2f}' for x in cpu[k])} s (median {cmed[k]:.2f})")
        print(f"  tokens/s ratios (wall medians): new/generate x{med['generate'] / med['new']:.2f}, "
              f"old/generate x{med['generate'] / med['old']:.2f}, new/old x{med['old'] / med['new']:.2f}; "
              f"CPU: new/generate x{cmed['generate'] / cmed['new']:.2f}, new/old x{cmed['old'] / cmed['new']:.2f}")
        print(f"  old vs new (seed 1234): same tokens {same}, max |d logprob| {dlp:.3g}")


if __name__ == "__main__":
    main(sys.argv[1:])
