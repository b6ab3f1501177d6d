"""``python -m benchmarks.logit_window [REPS]``: CPU time of one train forward/backward, full vs response-only logits.

SmolLM2-135M (fp32, TP1, 1 thread), one micro-batch of 4 x (144 prompt + 48 response) random tokens, the profile's
shape in docs/performance.md. Each repetition runs ``trainer.step._forward_backward`` once with full logits
(``logits_start`` patched to 0) and once as the trainer runs it, interleaved, timed with ``time.process_time``
after one warm-up. Prints the per-run CPU seconds and the mean effect.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT, RESPONSE, ROWS = 144, 48, 4


def _worker(mcore_dir: str, reps: int, out: str) -> None:
    from unittest import mock

    from megatron_pz import checkpoint as ckpt
    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.config import OptimConfig
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.trainer import step
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.optimizer import setup_training
    from megatron_pz.types import Sample, Status, Task

    torch.set_num_threads(1)
    par = ParallelConfig()
    init_distributed(par)
    arch = ckpt.read_arch(mcore_dir)
    model = build_model(arch, ModelConfig(dtype="fp32"), par)
    ckpt.load(mcore_dir, model, arch)
    state = setup_training(model, OptimConfig(lr=1e-6), total_steps=1)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(task=Task.MASK_PRED, group_id="g",
                      prompt_ids=torch.randint(0, arch.vocab_size, (PROMPT,), generator=g).tolist(),
                      response_ids=torch.randint(0, arch.vocab_size, (RESPONSE,), generator=g).tolist(),
                      rollout_logprobs=[-1.0] * RESPONSE, status=Status.COMPLETED, advantage=1.0)
               for _ in range(ROWS)]
    mbs = build_microbatches(samples, micro_batch_size=ROWS)

    def once() -> float:
        for m in state.model:
            m.train()
            m.zero_grad_buffer()
        t = time.process_time()
        step._forward_backward(state.model, mbs, LossConfig(), arch.vocab_size, 1.0, forward_only=False)
        return time.process_time() - t

    once()  # warm-up
    times: dict[str, list[float]] = {"full": [], "window": []}
    for _ in range(reps):
        with mock.patch.object(step, "logits_start", return_value=0):
            times["full"].append(once())
        times["window"].append(once())
    Path(out).write_text(json.dumps(times))


def main(argv: list[str]) -> None:
    from megatron_pz.convert.smollm2 import prepare_smollm2
    from megatron_pz.parallel import spawn_local

    reps = int(argv[0]) if argv else 3
    _, mcore = prepare_smollm2()
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "times.json")
        spawn_local(_worker, 1, (str(mcore), reps, out))
        times = json.loads(Path(out).read_text())
    full, window = (sum(times[k]) / len(times[k]) for k in ("full", "window"))
    print(f"full logits: {', '.join(f'{t:.2f}' for t in times['full'])} CPU-s (mean {full:.2f})")
    print(f"window:      {', '.join(f'{t:.2f}' for t in times['window'])} CPU-s (mean {window:.2f})")
    print(f"effect: {window / full - 1:+.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
