"""The training matmul FLOPs a step of the loop (``train.py``) executed, as laid out (the benchmark's train FLOP/s is this over the train
time): every row position through the layers (padding included, a shared prompt once per micro-batch), the
attention the rows' masks allow (``RowLayout.useful_pairs``: masked scores, which the dense layouts compute and
the segment attention mostly skips, are not useful work), the output layer from ``logits_start`` on where the
model slices it (``plan.flops.microbatch_flops``)."""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from megatron_pz import device
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.logit_window import slicing_supported
from megatron_pz.plan.flops import microbatch_flops
from megatron_pz.trainer.batching import MicroBatch
from megatron_pz.trainer.step import logits_start


def executed_flops(chunks: list[torch.nn.Module], arch: ModelArch, microbatches: list[MicroBatch]) -> float:
    """This DP rank's micro-batches' FLOPs, summed over the DP replicas (collective over the DP group)."""
    sliced = slicing_supported(chunks[0].config)
    flops = sum(microbatch_flops(arch, *mb.tokens.shape,
                                 logit_positions=mb.tokens.shape[1] - logits_start(mb) if sliced else None,
                                 attention_pairs=None if mb.layout is None else mb.layout.useful_pairs())
                for mb in microbatches)
    total = torch.tensor([flops], dtype=torch.float64, device=device.default_device())
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total.item())
