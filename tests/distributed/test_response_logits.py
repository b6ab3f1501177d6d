"""The train step with logits only from the first response position equals the full-logits step (fp32, gloo).

In each layout one process group runs the same micro-batches twice through ``step._forward_backward`` (Megatron
DDP, per-token loss, finalize_model_grads): once with the output layer on every position (``logits_start``
patched to 0, the previous behaviour) and once as the trainer runs it. The loss metrics, every parameter
gradient and the forward-only log-probs of the response tokens must agree (per tensor max|diff| / max|ref|).
"""
import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc
REL_TOL = 1e-5
TEMPERATURE = 0.7


def _samples():
    """4 samples with different prompt lengths (vocab 300): two micro-batches of 2 whose windows start at 8 and 6."""
    from megatron_pz.types import Sample, Status, Task

    g = torch.Generator().manual_seed(7)
    out = []
    for i, (p, r) in enumerate([(9, 5), (12, 3), (7, 8), (10, 6)]):
        ids = torch.randint(1, 300, (p + r,), generator=g).tolist()
        out.append(Sample(task=Task.MASK_PRED, group_id=f"g{i % 2}", prompt_ids=ids[:p], response_ids=ids[p:],
                          rollout_logprobs=(-torch.rand(r, generator=g) * 4).tolist(), status=Status.COMPLETED,
                          advantage=(1.0, -0.5, 0.8, -1.2)[i]))
    return out


def _step_worker(hf_dir: str, tp: int, pp: int, out_path: str) -> None:
    from unittest import mock

    from megatron.core import parallel_state as ps

    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.config import OptimConfig
    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model, unwrap
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.trainer import step
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.optimizer import setup_training

    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(par)
    hf = HFCheckpoint(hf_dir)
    arch = ModelArch.from_hf_config(hf.config())
    model = build_model(arch, ModelConfig(dtype="fp32"), par)
    load_hf_into_model(model, hf.get, arch)
    state = setup_training(model, OptimConfig(lr=1e-6), total_steps=1)
    mbs = build_microbatches(_samples(), micro_batch_size=2, seq_multiple=8, same_length=pp > 1)
    inner = unwrap(state.model[0])
    seen: list[int] = []  # positions the output layer produced logits for, per call
    if ps.is_pipeline_last_stage():
        inner.output_layer.register_forward_hook(lambda m, a, out: seen.append(out[0].shape[0]))

    def run() -> dict:
        seen.clear()
        for m in state.model:
            m.train()
            m.zero_grad_buffer()
        reports = step._forward_backward(state.model, mbs, LossConfig(), arch.vocab_size, TEMPERATURE,
                                         forward_only=False)
        grads = {n: p.main_grad.detach().clone() for n, p in inner.named_parameters()}
        logps = step.forward_logprobs(state.model, mbs, arch.vocab_size, TEMPERATURE)
        return {"reports": reports, "grads": grads, "logps": logps, "seen": list(seen)}

    with mock.patch.object(step, "logits_start", return_value=0):
        ref = run()
    new = run()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    result = {
        "grad_rel": {n: rel(new["grads"][n], g) for n, g in ref["grads"].items()},
        "grad_nonzero": all(float(g.abs().max()) > 0 for g in ref["grads"].values()),
        "metric_rel": {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-30)
                       for a, b in zip(new["reports"], ref["reports"]) for k in b if not k.startswith("_")},
        "tokens": [(a["_tokens"], b["_tokens"]) for a, b in zip(new["reports"], ref["reports"])],
        "logp_rel": [rel(a[mb.loss_mask > 0], b[mb.loss_mask > 0])
                     for a, b, mb in zip(new["logps"], ref["logps"], mbs)],
        "seen_ref": ref["seen"], "seen_new": new["seen"], "seq": [mb.tokens.shape[1] for mb in mbs],
    }
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(result, out_path)
    else:  # other stages / TP ranks: their gradients too (embedding and first layers live on stage 0 at PP2)
        torch.save(result, f"{out_path}.{torch.distributed.get_rank()}")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_response_logits_step_equals_full_logits(tiny_qwen3_hf, tmp_path, tp, pp):
    out = tmp_path / "result.pt"
    spawn_local(_step_worker, tp * pp, (tiny_qwen3_hf, tp, pp, str(out)))
    last = torch.load(out)
    others = [torch.load(p) for p in tmp_path.glob("result.pt.*")]
    assert len(others) == tp * pp - 1
    # The output layer really ran on fewer positions: windows start at 8 and 6 (see _samples), so S - 8 and S - 6
    # logits per pass instead of S (two passes per micro-batch: train step and forward-only).
    s = last["seq"]
    assert last["seen_ref"] == [s[0], s[1]] * 2
    assert last["seen_new"] == [s[0] - 8, s[1] - 6] * 2
    assert last["tokens"] == [(8, 8), (14, 14)] and len(last["metric_rel"]) > 3
    worst = max(last["metric_rel"].values())
    print(f"\nTP{tp}/PP{pp}: loss metrics max rel diff {worst:.2e}; "
          f"grads max rel diff {max(max(r['grad_rel'].values()) for r in [last, *others]):.2e}")
    assert worst <= REL_TOL, last["metric_rel"]
    assert max(last["logp_rel"]) <= REL_TOL
    for r in [last, *others]:
        assert r["grad_nonzero"]
        bad = {n: v for n, v in r["grad_rel"].items() if v > REL_TOL}
        assert not bad, bad
