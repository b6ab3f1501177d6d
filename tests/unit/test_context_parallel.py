"""Context parallelism's layout (trainer/context_parallel.py) against the unsplit sequence, and its refusal.

The split is Megatron's load-balanced one: 2 x CP chunks, CP rank r holding chunks r and 2CP - 1 - r. A stand-in
model (token and position embeddings, then causal prefix-mean "attention" whose keys come from every rank, as
TE's ring attention gathers them) computed per CP rank on its slice gives the unsplit model's log-probs, and the
loss over each rank's held response tokens sums to the unsplit loss, with token counts that add up."""
import pytest
import torch

from megatron_pz.config import load_config
from megatron_pz.errors import ConfigError
from megatron_pz.trainer.context_parallel import (chunk_ids, gather_positions, local_columns, local_positions,
                                                  split_sequence)
from megatron_pz.trainer.preflight import check_parallel


def test_megatron_layout_by_hand():
    assert [chunk_ids(2, r) for r in (0, 1)] == [(0, 3), (1, 2)]
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert local_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    cols = torch.tensor([[1, 2, 6, 7]])
    local, held = local_columns(cols, 8, 2, 0)
    assert held.tolist() == [[True, False, True, True]] and local[held].tolist() == [1, 2, 3]
    local, held = local_columns(cols, 8, 2, 1)
    assert held.tolist() == [[False, True, False, False]] and local[held].tolist() == [0]
    with pytest.raises(ValueError, match="not a multiple of 2 x CP = 4"):
        split_sequence(torch.zeros(1, 6), 2, 0)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_then_gather_is_the_sequence(cp):
    x = torch.randn(3, 16, 5)
    parts = [split_sequence(x, cp, r) for r in range(cp)]
    assert all(p.shape == (3, 16 // cp, 5) for p in parts)
    assert torch.equal(gather_positions(parts, cp), x)
    assert sorted(torch.cat([local_positions(16, cp, r) for r in range(cp)]).tolist()) == list(range(16))


class StandIn(torch.nn.Module):
    """logits[t] = out(mean_{s <= t} h[s]), h = emb(token) + pos(position): causal mixing across positions."""

    def __init__(self, vocab=11, seq=16, width=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, width, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(seq, width, generator=g))
        self.out = torch.nn.Parameter(torch.randn(width, vocab, generator=g))

    def hidden(self, tokens, positions):
        return self.emb[tokens] + self.pos[positions]

    def logits(self, query_pos, keys, key_pos):
        """Queries at global ``query_pos`` [S_q] attend causally to keys [B, S_k, W] at ``key_pos`` [S_k]."""
        allowed = (key_pos[None, :] <= query_pos[:, None]).float()  # [S_q, S_k]
        mixed = torch.einsum("qk,bkw->bqw", allowed / allowed.sum(-1, keepdim=True), keys)
        return mixed @ self.out


@pytest.mark.parametrize("cp", [2, 4])
def test_per_rank_loss_and_logprobs_reassemble_to_the_unsplit_sequence(cp):
    torch.manual_seed(1)
    seq, model = 16, StandIn()
    tokens = torch.randint(0, 11, (2, seq))
    rows = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    cols = torch.tensor([[3, 4, 5, 6, 7], [9, 10, 11, 12, 13]])  # the logit at t predicts t + 1
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
    labels = tokens[rows, (cols + 1).clamp(max=seq - 1)]
    positions = torch.arange(seq)

    full_logp = torch.log_softmax(model.logits(positions, model.hidden(tokens, positions), positions), -1)
    full_loss = -(full_logp[rows, cols].gather(-1, labels[..., None])[..., 0] * mask).sum()
    full_grad = torch.autograd.grad(full_loss, model.emb)[0]

    # every rank's keys, as the ring exchange passes them round (its backward sends their gradients back to the
    # rank that owns them, so here they stay in the graph)
    keys = [model.hidden(split_sequence(tokens, cp, r), local_positions(seq, cp, r)) for r in range(cp)]
    losses, counts, logps = [], 0, []
    for r in range(cp):
        mine = local_positions(seq, cp, r)
        all_keys = torch.cat(keys, dim=1)
        all_pos = torch.cat([local_positions(seq, cp, q) for q in range(cp)])
        logp = torch.log_softmax(model.logits(mine, all_keys, all_pos), -1)  # [B, S / CP, V]
        logps.append(logp.detach())
        local, held = local_columns(cols, seq, cp, r)
        m = mask * held
        losses.append(-(logp[rows, local].gather(-1, labels[..., None])[..., 0] * m).sum())
        counts += int(m.sum())
    grad = torch.autograd.grad(sum(losses), model.emb)[0]  # what DDP's reduction over the CP group sums
    assert counts == int(mask.sum())
    assert torch.allclose(sum(losses), full_loss, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gather_positions(logps, cp), full_logp, atol=1e-6)
    assert torch.allclose(grad, full_grad, atol=1e-5)


def test_context_parallelism_is_refused_in_one_line_naming_the_key():
    check_parallel(load_config(None))  # CP 1: nothing to refuse
    with pytest.raises(ConfigError) as e:
        check_parallel(load_config(None, ["parallel.context_parallel_size=2", "model.transformer_impl=local"]))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("parallel.context_parallel_size=2 needs Transformer Engine")
    assert msg.endswith("set parallel.context_parallel_size=1")
