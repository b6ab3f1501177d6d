"""``python -m benchmarks.shared_prompt [REPS]``: CPU time of one train forward/backward per micro-batch layout.

SmolLM2-135M (fp32, TP1, 1 thread). Workloads:

* "predictor" / "generator": one GRPO group of 4 samples sharing a 240-token prompt (the quickstart's
  micro_batch_size and group size), answers of 12-40 / responses of 48-96 tokens; layouts unshared and shared;
* "mixed": two groups of 4 with prompts of 120 and 300 tokens and responses of 16-96 tokens (two micro-batches of
  4 unshared); layouts unshared, shared, packed (``max_tokens_per_microbatch`` 1024) and packed + shared.

Each repetition runs ``trainer.step._forward_backward`` once per layout, interleaved (the unshared layout on the
model built as before, the others on the one built with ``masked_rows=True``), timed with ``time.process_time``
after one warm-up each. Prints per-run CPU seconds, medians, ratios to unshared, the row tokens the micro-batches
hold, and the predicted matmul FLOPs (``plan.flops.microbatch_flops``).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BUDGET = 1024
# name -> (groups as (prompt length, response lengths), micro_batch_size, layouts)
WORKLOADS = {
    "predictor": ([(240, [12, 20, 28, 40])], 4, ["unshared", "shared"]),
    "generator": ([(240, [48, 64, 80, 96])], 4, ["unshared", "shared"]),
    "mixed": ([(120, [16, 40, 64, 96]), (300, [24, 32, 56, 80])], 4,
              ["unshared", "shared", "packed", "packed+shared"]),
}
LAYOUTS = {"unshared": {}, "shared": dict(shared_prompt=True), "packed": dict(max_tokens=BUDGET),
           "packed+shared": dict(shared_prompt=True, max_tokens=BUDGET)}


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
    for masked in (False, True):
        model = build_model(arch, ModelConfig(dtype="fp32"), par, masked_rows=masked)
        ckpt.load(mcore_dir, model, arch)
        states[masked] = setup_training(model, OptimConfig(lr=1e-6), total_steps=1)
    g = torch.Generator().manual_seed(0)
    result: dict = {}
    for name, (groups, mbs_size, layouts) in WORKLOADS.items():
        samples = []
        for gi, (p, lengths) in enumerate(groups):
            prompt = torch.randint(0, arch.vocab_size, (p,), generator=g).tolist()
            samples += [Sample(task=Task.MASK_PRED, group_id=f"{name}{gi}", prompt_ids=prompt,
                               response_ids=torch.randint(0, arch.vocab_size, (r,), generator=g).tolist(),
                               rollout_logprobs=[-1.0] * r, status=Status.COMPLETED, advantage=(-1.0) ** i)
                        for i, r in enumerate(lengths)]
        mbs = {k: build_microbatches(samples, micro_batch_size=mbs_size, **LAYOUTS[k]) for k in layouts}

        def once(layout: str) -> float:
            state = states[bool(LAYOUTS[layout])]
            for m in state.model:
                m.train()
                m.zero_grad_buffer()
            t = time.process_time()
            step._forward_backward(state.model, mbs[layout], LossConfig(), arch.vocab_size, 1.0, forward_only=False)
            return time.process_time() - t

        for k in layouts:  # warm-up
            once(k)
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for _ in range(reps):
            for k in layouts:
                times[k].append(once(k))
        result[name] = {
            "times": times,
            "shapes": {k: [list(mb.tokens.shape) for mb in mbs[k]] for k in layouts},
            "tokens": {k: sum(mb.tokens.numel() for mb in mbs[k]) for k in layouts},
            "flops": {k: sum(microbatch_flops(arch, *mb.tokens.shape, logit_positions=mb.tokens.shape[1]
                                              - step.logits_start(mb)) for mb in mbs[k]) for k in layouts},
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
        print(f"{name} (groups {WORKLOADS[name][0]}, micro_batch_size {WORKLOADS[name][1]}):")
        for k in t:
            print(f"  {k:13s} {', '.join(f'{x:.2f}' for x in t[k])} CPU-s (median {med[k]:.2f}, "
                  f"x{med[k] / med['unshared']:.3f}); rows {r['shapes'][k]}: {tok[k]} tokens "
                  f"(x{tok[k] / tok['unshared']:.3f}); {fl[k] / 1e12:.3f} TFLOP predicted "
                  f"(x{fl[k] / fl['unshared']:.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
