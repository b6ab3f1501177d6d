"""``python -m benchmarks.shared_prompt [REPS]``: CPU time of one train forward/backward, unshared vs shared prompt.

SmolLM2-135M (fp32, TP1, 1 thread). Two quickstart-shaped micro-batches of one GRPO group each (4 samples sharing
a 240-token prompt, the quickstart's micro_batch_size and group size): "predictor" with answers of 12-40 tokens,
"generator" with responses of 48-96 tokens. Each repetition runs ``trainer.step._forward_backward`` on the
unshared layout (one sample per row, the model built as before) and on shared-prompt rows (the model built with
``shared_prompt=True``), interleaved, timed with ``time.process_time`` after one warm-up each. Prints per-run CPU
seconds, medians, the ratio shared / unshared, the tokens the rows hold, and the predicted matmul FLOPs ratio
(``plan.flops.microbatch_flops``).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = 240
SHAPES = {"predictor": [12, 20, 28, 40], "generator": [48, 64, 80, 96]}


def _worker(mcore_dir: str, reps: int, out: str) -> None:
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.config import OptimConfig
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.plan.flops import microbatch_flops
    from megatron_pz.trainer import step
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.optimizer import setup_training
    from megatron_pz.types import Sample, Status, Task

    torch.set_num_threads(1)
    par = ParallelConfig()
    init_distributed(par)
    arch = ckpt.read_arch(mcore_dir)
    states = {}
    for shared in (False, True):
        model = build_model(arch, ModelConfig(dtype="fp32"), par, shared_prompt=shared)
        ckpt.load(mcore_dir, model, arch)
        states[shared] = setup_training(model, OptimConfig(lr=1e-6), total_steps=1)
    g = torch.Generator().manual_seed(0)
    result: dict = {}
    for name, lengths in SHAPES.items():
        prompt = torch.randint(0, arch.vocab_size, (PROMPT,), generator=g).tolist()
        samples = [Sample(task=Task.MASK_PRED, group_id=name, prompt_ids=prompt,
                          response_ids=torch.randint(0, arch.vocab_size, (r,), generator=g).tolist(),
                          rollout_logprobs=[-1.0] * r, status=Status.COMPLETED, advantage=(-1.0) ** i)
                   for i, r in enumerate(lengths)]
        mbs = {shared: build_microbatches(samples, micro_batch_size=len(lengths), shared_prompt=shared)
               for shared in (False, True)}

        def once(shared: bool) -> float:
            state = states[shared]
            for m in state.model:
                m.train()
                m.zero_grad_buffer()
            t = time.process_time()
            step._forward_backward(state.model, mbs[shared], LossConfig(), arch.vocab_size, 1.0, forward_only=False)
            return time.process_time() - t

        times: dict[str, list[float]] = {"unshared": [], "shared": []}
        once(False), once(True)  # warm-up
        for _ in range(reps):
            times["unshared"].append(once(False))
            times["shared"].append(once(True))
        result[name] = {
            "times": times,
            "tokens": {k: sum(mb.tokens.numel() for mb in mbs[s]) for k, s in (("unshared", False), ("shared", True))},
            "flops": {k: sum(microbatch_flops(arch, *mb.tokens.shape, logit_positions=mb.tokens.shape[1]
                                              - step.logits_start(mb)) for mb in mbs[s])
                      for k, s in (("unshared", False), ("shared", True))},
        }
    Path(out).write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    from megatron_pz.convert.smollm2 import prepare_smollm2
    from megatron_pz.parallel import spawn_local

    reps = int(argv[0]) if argv else 5
    _, mcore = prepare_smollm2()
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "times.json")
        spawn_local(_worker, 1, (str(mcore), reps, out))
        result = json.loads(Path(out).read_text())
    for name, r in result.items():
        t, tok, fl = r["times"], r["tokens"], r["flops"]
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"{name} (prompt {PROMPT}, responses {SHAPES[name]}):")
        for k in ("unshared", "shared"):
            print(f"  {k:9s} {', '.join(f'{x:.2f}' for x in t[k])} CPU-s (median {med[k]:.2f}); "
                  f"{tok[k]} row tokens; {fl[k] / 1e12:.3f} TFLOP predicted")
        print(f"  shared / unshared: time {med['shared'] / med['unshared']:.3f} (median of {len(t['shared'])}), "
              f"tokens {tok['shared'] / tok['unshared']:.3f}, predicted FLOPs {fl['shared'] / fl['unshared']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
