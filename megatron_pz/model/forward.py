"""Forward-only passes through Megatron's pipeline schedule: full logits (for parity checks, evaluation).

The trainer computes log-probabilities vocab-parallel without materialising full logits; this module is for
the places that really want full ``[B, T, V]`` logits. Logits are gathered across TP and trimmed from the
padded vocabulary to the true one, so padded rows never surface.
"""
from __future__ import annotations

import torch


def gather_vocab_parallel(logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., V_pad/TP] on each TP rank -> [..., vocab_size] (all TP ranks get the result)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if tp > 1:
        parts = [torch.empty_like(logits_shard) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits_shard.contiguous(),
                                     group=ps.get_tensor_model_parallel_group())
        logits_shard = torch.cat(parts, dim=-1)
    return logits_shard[..., :vocab_size]


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] positions 0..T-1."""
    b, t = input_ids.shape
    return torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)


@torch.no_grad()
def forward_logits(model_chunks: list[torch.nn.Module], input_ids: torch.Tensor,
                   vocab_size: int) -> torch.Tensor | None:
    """Causal-LM logits [B, T, vocab_size] for ``input_ids`` [B, T] through the pipeline schedule.

    Returns the logits on the last pipeline stage and None on the others. One micro-batch.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected: list[torch.Tensor] = []
    b, t = input_ids.shape

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        out = model(ids, position_ids_for(ids), attention_mask=None)

        def loss_func(output: torch.Tensor):
            collected.append(output)
            return output.new_zeros(()), {}

        return out, loss_func

    for m in model_chunks:
        m.eval()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([input_ids]), model=model_chunks,
        num_microbatches=1, seq_length=t, micro_batch_size=b, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return gather_vocab_parallel(collected[0], vocab_size)
