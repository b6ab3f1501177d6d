"""DP=2 over gloo gives the DP=1 gradient: each rank holds half the batch, the loss is normalised by the global
token count (itself all-reduced on device), and gradients are all-reduced with SUM."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_pz.algo.loss import LossConfig, policy_loss

WORLD = 2


def toy_batch(B=8, T=6, V=7, H=5):
    """Deterministic batch for a linear 'policy' (same construction on every process)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    W0 = torch.randn(H, V, generator=g, dtype=torch.float64)
    old = torch.log_softmax(x @ W0, -1).gather(-1, tokens[..., None])[..., 0]
    rollout = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    W = W0 + 0.5 * torch.randn(H, V, generator=g, dtype=torch.float64)
    return x, tokens, mask, adv, old, rollout, W


def local_grad(rows: slice, num_global_tokens) -> torch.Tensor:
    x, tokens, mask, adv, old, rollout, W = toy_batch()
    W = W.clone().requires_grad_(True)
    logp = torch.log_softmax(x[rows] @ W, -1).gather(-1, tokens[rows][..., None])[..., 0]
    loss, _ = policy_loss(logp, old[rows], adv[rows], mask[rows], num_global_tokens, LossConfig(),
                          rollout_logprobs=rollout[rows])
    loss.backward()
    return W.grad


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        half = 8 // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        n_tokens = toy_batch()[2][rows].sum()
        dist.all_reduce(n_tokens, op=dist.ReduceOp.SUM)  # global valid tokens, kept as a tensor
        grad = local_grad(rows, n_tokens)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        torch.save({"grad": grad, "n_tokens": n_tokens}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
def test_dp2_gradient_equals_dp1(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    mask = toy_batch()[2]
    dp1 = local_grad(slice(0, 8), mask.sum().item())
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["n_tokens"].item() == mask.sum().item()
        assert torch.allclose(result["grad"], dp1, rtol=1e-12, atol=1e-14)
    assert dp1.abs().sum() > 0
