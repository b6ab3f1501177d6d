"""``python -m benchmarks.shared_prompt [REPS] [WORKLOAD ...]``: CPU time of one train forward/backward per
micro-batch layout.

fp32, TP1, 1 thread. Workloads:

* "predictor" / "generator": one GRPO group of 4 samples sharing a 240-token prompt (the quickstart's
  micro_batch_size and group size), answers of 12-40 / responses of 48-96 tokens; SmolLM2-135M;
* "mixed": two groups of 4 with prompts of 120 and 300 tokens and responses of 16-96 tokens (two micro-batches of
  4 unshared), also packed (``max_tokens_per_microbatch`` 1024); SmolLM2-135M;
* "long": the paper's regime [PZ §4.1: 8 responses per prompt], one group of 8 responses of 384 tokens behind a
  400-token prompt, ``micro_batch_size`` 8 (one shared row of 3,472 tokens); SmolLM2-135M's shape cut to 6 of its
  30 layers, random weights (the dense mask's ``S x S`` scores of all 30 layers would not fit this machine's
  memory beside other jobs; per layer the work is SmolLM2's).

Layouts: unshared (one sample per row, causal), shared / packed / packed+shared with the dense ``[B, 1, S, S]``
mask, and ``-seg`` the same rows through the segment core attention (``model/segment_attention.py``,
``train.shared_prompt_attention: segments``). Each repetition runs ``trainer.step._forward_backward`` once per
layout, interleaved (unshared on the model built as before, the others on one built with ``masked_rows`` and the
segment core attention, which takes the dense mask as ``DotProductAttention`` does), timed with
``time.process_time`` after one warm-up each. Prints per-run CPU seconds, medians, ratios to unshared, row
tokens, the predicted matmul FLOPs of what each layout computes (``plan.flops.microbatch_flops``: S x S per row
for the dense layouts, ``RowLayout.segment_pairs`` for ``-seg``), and the activations autograd saves for backward
in one forward (MB, parameters excluded).
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
# name -> (groups as (prompt length, response lengths), micro_batch_size, layouts, layers: None = all, loaded)
WORKLOADS = {
    "predictor": ([(240, [12, 20, 28, 40])], 4, ["unshared", "shared", "shared-seg"], None),
    "generator": ([(240, [48, 64, 80, 96])], 4, ["unshared", "shared", "shared-seg"], None),
    "mixed": ([(120, [16, 40, 64, 96]), (300, [24, 32, 56, 80])], 4,
              ["unshared", "shared", "shared-seg", "packed", "packed-seg", "packed+shared", "packed+shared-seg"],
              None),
    "long": ([(400, [384] * 8)], 8, ["unshared", "shared", "shared-seg"], 6),
}
LAYOUTS = {"unshared": {}, "shared": dict(shared_prompt=True), "packed": dict(max_tokens=BUDGET),
           "packed+shared": dict(shared_prompt=True, max_tokens=BUDGET)}
LAYOUTS.update({f"{k}-seg": dict(v, attention="segments") for k, v in list(LAYOUTS.items()) if v})


def _saved_mb(fn, params: set[int]) -> float:
    """MB of the distinct storages autograd saves for backward while ``fn`` runs (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def _worker(mcore_dir: str, reps: int, names: list[str], out: str) -> None:
    import dataclasses

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
    full = ckpt.read_arch(mcore_dir)
    g = torch.Generator().manual_seed(0)
    result: dict = {}
    for name in names:
        groups, mbs_size, layouts, layers = WORKLOADS[name]
        arch = full if layers is None else dataclasses.replace(full, num_layers=layers)
        states = {}
        for masked in (False, True):
            model = build_model(arch, ModelConfig(dtype="fp32"), par, masked_rows=masked, segment_attention=masked)
            if layers is None:
                ckpt.load(mcore_dir, model, arch)
            states[masked] = setup_training(model, OptimConfig(lr=1e-6), total_steps=1)
        samples = []
        for gi, (p, lengths) in enumerate(groups):
            prompt = torch.randint(0, arch.vocab_size, (p,), generator=g).tolist()
            samples += [Sample(task=Task.MASK_PRED, group_id=f"{name}{gi}", prompt_ids=prompt,
                               response_ids=torch.randint(0, arch.vocab_size, (r,), generator=g).tolist(),
                               rollout_logprobs=[-1.0] * r, status=Status.COMPLETED, advantage=(-1.0) ** i)
                        for i, r in enumerate(lengths)]
        mbs = {k: build_microbatches(samples, micro_batch_size=mbs_size, **LAYOUTS[k]) for k in layouts}

        def run(layout: str) -> None:
            state = states[bool(LAYOUTS[layout])]
            for m in state.model:
                m.train()
                m.zero_grad_buffer()
            step._forward_backward(state.model, mbs[layout], LossConfig(), arch.vocab_size, 1.0, forward_only=False)

        def once(layout: str) -> float:
            t = time.process_time()
            run(layout)
            return time.process_time() - t

        def computed_pairs(mb) -> int | None:  # what the layout's attention computes (None: S x S per row)
            return mb.layout.segment_pairs() if not isinstance(mb.attention_mask, (torch.Tensor, type(None))) else None

        params = {p.untyped_storage().data_ptr() for st in states.values() for m in st.model for p in m.parameters()}
        saved = {k: _saved_mb(lambda: run(k), params) for k in layouts}  # also the warm-up
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for _ in range(reps):
            for k in layouts:
                times[k].append(once(k))
        result[name] = {
            "times": times, "saved_mb": saved, "layers": arch.num_layers,
            "shapes": {k: [list(mb.tokens.shape) for mb in mbs[k]] for k in layouts},
            "tokens": {k: sum(mb.tokens.numel() for mb in mbs[k]) for k in layouts},
            "flops": {k: sum(microbatch_flops(arch, *mb.tokens.shape, logit_positions=mb.tokens.shape[1]
                                              - step.logits_start(mb), attention_pairs=computed_pairs(mb))
                             for mb in mbs[k]) for k in layouts},
        }
        del states
    Path(out).write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    from megatron_pz.convert.smollm2 import prepare_smollm2
    from megatron_pz.parallel import spawn_local

    reps = int(argv[0]) if argv else 5
    names = argv[1:] or list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    _, mcore = prepare_smollm2()
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "times.json")
        spawn_local(_worker, 1, (str(mcore), reps, names, out))
        result = json.loads(Path(out).read_text())
    for name, r in result.items():
        t, tok, fl, mem = r["times"], r["tokens"], r["flops"], r["saved_mb"]
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"{name} (groups {WORKLOADS[name][0]}, micro_batch_size {WORKLOADS[name][1]}, {r['layers']} layers):")
        for k in t:
            print(f"  {k:17s} {', '.join(f'{x:.2f}' for x in t[k])} CPU-s (median {med[k]:.2f}, "
                  f"x{med[k] / med['unshared']:.3f}); rows {r['shapes'][k]}: {tok[k]} tokens "
                  f"(x{tok[k] / tok['unshared']:.3f}); {fl[k] / 1e12:.3f} TFLOP predicted "
                  f"(x{fl[k] / fl['unshared']:.3f}); saved activations {mem[k]:.0f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
