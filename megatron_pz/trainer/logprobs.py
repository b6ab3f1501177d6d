"""Token log-probs and entropy from vocab-parallel logits on the last pipeline stage.

Logits arrive as ``[B, S', V_pad / TP]`` on each TP rank (S' = the positions the train step asked the model for,
see ``model/logit_window.py``). Rows past the true vocabulary (Megatron's padding) are
masked to -inf first: they must not take probability mass, exactly as the rollout engine never samples them.
Temperature scaling matches what the rollout engine reports (``rollout/protocol.py``): log softmax(logits / T).
"""
from __future__ import annotations

import torch


def _mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    if start + local <= vocab_size:
        return logits
    keep = torch.arange(start, start + local, device=logits.device) < vocab_size  # [V_local]
    return logits.masked_fill(~keep, float("-inf"))


def scaled_logits(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """fp32 logits / T with padded vocab rows at -inf. [B, S, V_local]"""
    out = logits.float()
    if temperature not in (0.0, 1.0):  # T=0 (greedy) reports plain log_softmax, like SGLang
        out = out / temperature
    return _mask_padded_vocab(out, vocab_size)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) [B, S] from scaled vocab-parallel logits [B, S, V_local] (differentiable).

    Megatron's ``vocab_parallel_cross_entropy`` does the TP reductions (max, sum-exp, target logit) and has a
    hand-written backward; it returns -log p.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # It subtracts the max in place: hand it its own copy so callers can still use ``logits``.
    return -vocab_parallel_cross_entropy(logits.clone(), labels)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk_rows: int = 1024, finite: bool = False) -> torch.Tensor:
    """Entropy [B, S] of the full (TP-sharded) distribution, for logging. No gradient.

    Works through ``chunk_rows`` token rows at a time: the fp32 temporaries (z, exp z, exp z * z) would otherwise
    be three more copies of the [B, S, V_local] logits, the largest tensor of the step at paper scale.
    ``finite=True`` (no padded vocabulary rows at -inf) skips the ``nan_to_num`` pass that guards 0 * -inf.
    """
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    m = logits.max(dim=-1, keepdim=True).values  # [B, S, 1]
    if tp > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    flat, flat_m = logits.reshape(-1, logits.shape[-1]), m.reshape(-1, 1)
    sum_e = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    sum_ez = torch.empty_like(sum_e)
    for i in range(0, flat.shape[0], chunk_rows):
        z = flat[i: i + chunk_rows] - flat_m[i: i + chunk_rows]
        e = torch.exp(z)  # padded rows: exp(-inf) = 0
        sum_e[i: i + chunk_rows] = e.sum(-1)
        sum_ez[i: i + chunk_rows] = (e * (z if finite else torch.nan_to_num(z, neginf=0.0))).sum(-1)
    if tp > 1:
        torch.distributed.all_reduce(sum_e, group=group)
        torch.distributed.all_reduce(sum_ez, group=group)
    # H = log sum e^z - E_p[z]
    return (torch.log(sum_e) - sum_ez / sum_e).reshape(logits.shape[:-1])
