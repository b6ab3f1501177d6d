"""How much of a train step's matmul work the response-only output layer saves, on quickstart-shaped batches.

Prints the figures (run with -s); docs/performance.md quotes them. The assertions check the window starts the
figures rest on, by hand: a row of prompt length P needs logits from P - 1 on.
"""
import torch

from megatron_pz.trainer.batching import build_microbatches
from megatron_pz.trainer.step import logits_start
from megatron_pz.types import Sample, Status, Task

# SmolLM2-135M-Instruct (config.json): the quickstart's policy.
H, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 576, 30, 9, 3, 64, 1536, 49152


def _samples(lengths):
    return [Sample(task=Task.MASK_PRED, group_id="g", prompt_ids=[1] * p, response_ids=[2] * r,
                   status=Status.COMPLETED, advantage=1.0) for p, r in lengths]


def _step_flops(mbs, window: bool) -> tuple[float, float]:
    """(output-layer, whole-model) matmul FLOPs of forward + backward (3 x forward) over the micro-batches."""
    per_token_layer = 2 * H * (HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM) + 2 * HEADS * HEAD_DIM * H \
        + 2 * 3 * H * FFN
    out_total = model_total = 0.0
    for mb in mbs:
        b, s = mb.tokens.shape
        s0 = logits_start(mb) if window else 0
        out = 2 * b * (s - s0) * H * VOCAB
        attn = 2 * 2 * b * s * s * HEADS * HEAD_DIM  # QK^T and AV, full S x S as the local spec computes them
        model_total += 3 * (LAYERS * (b * s * per_token_layer + attn) + out)
        out_total += 3 * out
    return out_total, model_total


def _report(name, mbs):
    out_full, all_full = _step_flops(mbs, window=False)
    out_win, all_win = _step_flops(mbs, window=True)
    print(f"\n{name}: output layer {out_full / 1e12:.3f} -> {out_win / 1e12:.3f} TFLOP per step "
          f"(-{1 - out_win / out_full:.1%}); output layer = {out_full / all_full:.1%} of the step's matmul FLOPs; "
          f"step matmul FLOPs -{1 - all_win / all_full:.1%}")
    return 1 - all_win / all_full


def test_output_layer_flops_saved_on_quickstart_shapes():
    # The profiled shape of docs/performance.md: 4 micro-batches of 4 sequences, 144 prompt + 48 response tokens.
    uniform = build_microbatches(_samples([(144, 48)] * 16), micro_batch_size=4)
    assert [logits_start(mb) for mb in uniform] == [143] * 4
    saved = _report("profiled shape (16 x 144 + 48)", uniform)
    assert 0.10 < saved < 0.20
    # Mixed lengths as the quickstart produces them (prompts up to corpus.max_prompt_tokens = 320 plus the
    # template, responses up to 96 generator / 64 predictor tokens): the window starts at the shortest prompt
    # of each micro-batch, so less is saved than with one prompt length.
    g = torch.Generator().manual_seed(0)
    lengths = [(int(torch.randint(120, 360, (1,), generator=g)), int(torch.randint(16, 97, (1,), generator=g)))
               for _ in range(32)]
    mixed = build_microbatches(_samples(lengths), micro_batch_size=4)
    for mb in mixed:
        prompts = [int(mb.cols[j, 0]) + 1 for j in range(mb.tokens.shape[0])]
        assert logits_start(mb) == min(prompts) - 1
    _report("mixed quickstart-like lengths (32 samples, prompts 120-359, responses 16-96)", mixed)
