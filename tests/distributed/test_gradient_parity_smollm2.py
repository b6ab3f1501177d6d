"""Several ranks, one gradient: on one fixed batch of SmolLM2-135M samples the train step's gradient is the same at
TP1 (one rank), PP2 (two stages) and DP2 (two ranks with half the batch each), in fp32 over gloo.

The gradient comes out of the real train path (``trainer/step.py`` ``compute_gradients``: Megatron DDP, the
pipeline schedule of ``get_forward_backward_func``, the GRPO policy loss with TIS, ``finalize_model_grads``), read
from the DDP gradient buffers (``main_grad``) before any optimizer step, and gathered to rank 0 under HF names
(``convert/bridge.py`` ``gather_hf_state_dict``, the weight sync's PP gather). The loss is one token-level mean over
the global batch (DAPO): the token sum of every micro-batch, divided by the global count of loss tokens, which
``finalize_model_grads`` all-reduces over DP. So the DP2 gradient is the gradient of the same global-batch loss,
not the mean of two per-rank means; the two halves have very different token counts (107 and 27) so that a
per-rank normalisation would show.

The batch: 8 samples whose prompts and responses are consecutive token runs of the shipped Wikipedia sample,
hand-set advantages of both signs, and hand-set rollout log-probs that make the TIS weights vary (some capped at
2). Per HF tensor the criterion is max|g - g_ref| / max|g_ref| <= 1e-5. A control shows the comparison can fail:
the gradient of half the batch differs from the whole batch's by far more than that. Run with -s for the figures.
"""
import json

import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
TOL = 1e-5
# (prompt tokens, response tokens, advantage); DP2: rank 0 gets the first 4 samples (107 loss tokens), rank 1 the
# last 4 (27 loss tokens)
LAYOUT = [(40, 31, 1.0), (24, 22, -0.5), (56, 29, 0.75), (33, 25, -1.25),
          (28, 9, 0.5), (47, 5, -1.0), (36, 6, 1.5), (30, 7, -0.25)]
MICRO_BATCH = 2


def rollout_logprob(k: int) -> float:
    """Hand-set engine log-prob of response token k: TIS weights min(exp(logp - this), 2) vary, some capped."""
    return -1.5 - 0.75 * (k % 4)


def make_batch(tokenizer) -> list[dict]:
    """Prompt and response of sample i: consecutive token runs of the i-th paragraph of the shipped corpus."""
    from megatron_pz.data.corpus import sample_corpus_path

    path = sorted(sample_corpus_path("train").glob("*.jsonl"))[0]
    paragraphs = [json.loads(line)["text"] for line in path.read_text().splitlines()[:len(LAYOUT)]]
    out = []
    for text, (p, r, adv) in zip(paragraphs, LAYOUT):
        ids = tokenizer.encode(text)
        assert len(ids) >= p + r, (len(ids), p, r)
        out.append({"prompt_ids": ids[:p], "response_ids": ids[p:p + r], "advantage": adv,
                    "rollout_logprobs": [rollout_logprob(k) for k in range(r)]})
    return out


def _samples(batch: list[dict]):
    from megatron_pz.types import Sample, Status, Task

    return [Sample(task=Task.RANDOM_SPAN, group_id=f"g{i}", status=Status.COMPLETED, **s) for i, s in enumerate(batch)]


def _reduce_over_shards(ddp_chunks) -> None:
    """With the distributed optimizer each DP rank holds the reduced gradient only on its shard of each bucket
    (a reduce-scatter): all-gather the shards so that every rank's ``main_grad`` is the whole reduced gradient."""
    import torch.distributed as dist
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for m in ddp_chunks:
        for group in [*m.bucket_groups, *m.expert_parallel_bucket_groups]:
            n, rank = group.intra_distributed_optimizer_instance_size, group.intra_distributed_optimizer_instance_rank
            if n == 1 or not group.ddp_config.use_distributed_optimizer:
                continue
            for bucket in group.buckets:
                shards = shard_buffer(bucket.grad_data, n)
                parts = [torch.empty_like(shards[0]) for _ in range(n)]
                dist.all_gather(parts, shards[rank].clone(), group=group.intra_distributed_optimizer_instance_group)
                for shard, part in zip(shards, parts):
                    shard.copy_(part)


def _grad_worker(mcore_dir: str, pp: int, batch_path: str, out_path: str, control_path: str | None) -> None:
    """Build SmolLM2 at PP ``pp`` x DP (the rest of the world), take this DP rank's share of the batch, compute the
    step's gradient, and save it (HF names) with the global token count on rank 0. ``control_path``: also the
    gradient of the first DP2 half alone (world of one only)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pz import checkpoint as ckpt
    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.config import OptimConfig
    from megatron_pz.convert.bridge import gather_hf_state_dict
    from megatron_pz.model.provider import ModelConfig, build_model, unwrap
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.optimizer import setup_training
    from megatron_pz.trainer.step import compute_gradients

    torch.set_num_threads(1)
    par = ParallelConfig(pipeline_model_parallel_size=pp)
    init_distributed(par)
    arch = ckpt.read_arch(mcore_dir)
    state = setup_training(build_model(arch, ModelConfig(dtype="fp32"), par), OptimConfig(lr=1e-4), 5)
    ckpt.load(mcore_dir, [unwrap(m) for m in state.model], arch)  # as trainer/setup.py load_initial_weights
    state.optimizer.reload_model_params()
    samples = _samples(json.loads(open(batch_path).read()))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = len(samples) // dp

    def gradient(mine):
        mbs = build_microbatches(mine, MICRO_BATCH, pad_id=0, seq_multiple=16, same_length=pp > 1)
        reports = compute_gradients(state, mbs, LossConfig(), arch.vocab_size, 1.0)
        _reduce_over_shards(state.model)
        tokens = torch.tensor([float(sum(r["_tokens"] for r in reports))])
        dist.all_reduce(tokens)  # only the last stage's reports count tokens: a sum over DP and PP
        return gather_hf_state_dict(state.model, arch, of=lambda p: p.main_grad), tokens.item()

    grads, tokens = gradient(samples[dp_rank * share:(dp_rank + 1) * share])
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "tokens": tokens}, out_path)
    if control_path is not None:
        torch.save(gradient(samples[:len(samples) // 2])[0], control_path)


def relative_differences(grads: dict, ref: dict) -> dict[str, float]:
    """Per tensor max|g - g_ref| / max|g_ref|."""
    assert set(grads) == set(ref)
    return {k: float((grads[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref}


def test_relative_differences_by_hand():
    ref = {"a": torch.tensor([2.0, -4.0]), "b": torch.tensor([[0.5, 0.0]])}
    got = {"a": torch.tensor([2.1, -4.0]), "b": torch.tensor([[0.5, -0.25]])}
    assert relative_differences(got, ref) == pytest.approx({"a": 0.1 / 4.0, "b": 0.25 / 0.5})


def test_gradient_tp1_pp2_dp2(smollm2, tmp_path):
    from transformers import AutoTokenizer

    hf_dir, mcore_dir = smollm2
    batch = make_batch(AutoTokenizer.from_pretrained(hf_dir))
    batch_path = tmp_path / "batch.json"
    batch_path.write_text(json.dumps(batch))
    n_tokens = sum(len(s["response_ids"]) for s in batch)
    out = {}
    for tag, world, pp in [("tp1", 1, 1), ("pp2", 2, 2), ("dp2", 2, 1)]:
        control = str(tmp_path / "half.pt") if tag == "tp1" else None
        spawn_local(_grad_worker, world, (mcore_dir, pp, str(batch_path), str(tmp_path / f"{tag}.pt"), control))
        out[tag] = torch.load(tmp_path / f"{tag}.pt")
        assert out[tag]["tokens"] == n_tokens, tag  # every loss token counted once, on every layout
    ref = out["tp1"]["grads"]
    assert all(float(g.abs().max()) > 0 for g in ref.values()), "a tensor without gradient"
    half = relative_differences(torch.load(tmp_path / "half.pt"), ref)
    print(f"\ncontrol, half the batch vs all of it: smallest per-tensor max rel. diff {min(half.values()):.3e}")
    assert min(half.values()) > 1000 * TOL
    for tag in ("pp2", "dp2"):
        rel = relative_differences(out[tag]["grads"], ref)
        worst = max(rel, key=rel.get)
        print(f"{tag} vs tp1: largest per-tensor max|diff|/max|ref| {rel[worst]:.3e} ({worst}), "
              f"median {sorted(rel.values())[len(rel) // 2]:.3e} over {len(rel)} tensors")
        assert rel[worst] <= TOL, (tag, worst, rel[worst])
