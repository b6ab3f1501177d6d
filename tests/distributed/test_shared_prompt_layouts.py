"""Shared-prompt and packed rows give the unshared padded layout's loss, gradients and log-probs (fp32, gloo;
TP1, TP2, PP2).

Models with the same weights in one process group: the reference built and fed as before (one sample per row,
causal), the others built with ``masked_rows=True`` (arbitrary-mask attention, unfused RoPE) and fed shared-prompt
rows, packed rows (``train.max_tokens_per_microbatch``) and packed shared-prompt groups
(``trainer/shared_prompt.py``), each attending through the dense ``[B, 1, S, S]`` mask and (``-segments``) through
the segment core attention (``model/segment_attention.py``, prompt and response blocks only); the latter also under
full and selective activation recomputation (the layout table goes through ``tensor_parallel.checkpoint``).
All run ``step._forward_backward`` (Megatron DDP, per-token loss, finalize_model_grads) on the same samples, three
GRPO groups with two DAPO-dropped samples. The micro-batches hold different samples in each layout, so the loss
metrics are compared over the step (token means weighted over micro-batches, the loss as its sum), the log-probs
per sample, and every parameter gradient (per tensor max|diff| / max|ref|).
"""
import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc
REL_TOL = 1e-5
TEMPERATURE = 0.7
BUDGET = 40  # tokens per packed micro-batch (samples are 7 to 20 tokens)
DENSE = {"shared": dict(shared_prompt=True), "packed": dict(max_tokens=BUDGET),
         "packed-shared": dict(shared_prompt=True, max_tokens=BUDGET)}
LAYOUTS = {**DENSE, **{f"{k}-segments": dict(v, attention="segments") for k, v in DENSE.items()},
           **{f"shared-segments-recompute-{r}": dict(shared_prompt=True, attention="segments", recompute=r)
              for r in ("full", "selective")}}
RECOMPUTE = {None: {}, "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
             "selective": dict(recompute_granularity="selective")}


def _samples():
    """3 groups (vocab 300) of 3, 2 and 5 trainable samples, prompts of 11, 6 and 9 tokens, plus 2 dropped."""
    from megatron_pz.types import Sample, Status, Task

    g = torch.Generator().manual_seed(11)
    out = []
    for gi, (p, sizes) in enumerate([(11, [5, 3, 7]), (6, [4, 9]), (9, [2, 6, 3, 5])]):
        prompt = torch.randint(1, 300, (p,), generator=g).tolist()
        for r in sizes + [4]:
            out.append(Sample(task=Task.MASK_PRED, group_id=f"g{gi}", prompt_ids=prompt,
                              response_ids=torch.randint(1, 300, (r,), generator=g).tolist(),
                              rollout_logprobs=(-torch.rand(r, generator=g) * 4).tolist(), status=Status.COMPLETED,
                              advantage=float(torch.randn(1, generator=g))))
    out[3].status = Status.FILTERED  # DAPO: dropped
    out[6].advantage = None  # not trainable
    out[-1].response_ids, out[-1].rollout_logprobs = out[-1].response_ids[:1], out[-1].rollout_logprobs[:1]
    return out


def _step_worker(hf_dir: str, tp: int, pp: int, out_path: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.config import OptimConfig
    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.row_layout import RowLayout
    from megatron_pz.model.provider import ModelConfig, build_model, unwrap
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.trainer import step
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.optimizer import setup_training

    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(par)
    hf = HFCheckpoint(hf_dir)
    arch = ModelArch.from_hf_config(hf.config())
    samples = _samples()

    def run(layout: dict) -> dict:
        layout = dict(layout)
        recompute = RECOMPUTE[layout.pop("recompute", None)]
        model = build_model(arch, ModelConfig(dtype="fp32", **recompute), par, masked_rows=bool(layout),
                            segment_attention=layout.get("attention") == "segments")
        load_hf_into_model(model, hf.get, arch)
        state = setup_training(model, OptimConfig(lr=1e-6), total_steps=1)
        mbs = build_microbatches(samples, micro_batch_size=3, seq_multiple=8, same_length=pp > 1, **layout)
        for m in state.model:
            m.train()
            m.zero_grad_buffer()
        reports = step._forward_backward(state.model, mbs, LossConfig(), arch.vocab_size, TEMPERATURE,
                                         forward_only=False)
        inner = unwrap(state.model[0])
        grads = {n: p.main_grad.detach().clone() for n, p in inner.named_parameters()}
        logps = step.forward_logprobs(state.model, mbs, arch.vocab_size, TEMPERATURE)
        per_sample = {}  # response tokens (unique here) -> trainer log-probs
        for lp, mb in zip(logps, mbs):
            for n in range(mb.labels.shape[0]):
                keep = mb.loss_mask[n] > 0
                per_sample[tuple(mb.labels[n][keep].tolist())] = lp[n][keep]
        # Token means combine over micro-batches (step._combine); the loss (a token sum per micro-batch) sums, and
        # the per-micro-batch max takes the max.
        metrics = {}
        if reports:  # last stage only
            metrics = {k: v for k, v in step._combine(reports).items()
                       if k not in ("train/loss", "train/mismatch_abs_max")}
            metrics["loss_sum"] = sum(r["loss"] for r in reports)
            metrics["mismatch_abs_max"] = max(r["mismatch_abs_max"] for r in reports)
        # which path attended: the segment core attention given RowLayouts, or a tensor mask / causal
        segments = (all(isinstance(mb.attention_mask, RowLayout) for mb in mbs)
                    and all(type(layer.self_attention.core_attention).__name__ == "SegmentAttention"
                            for layer in inner.decoder.layers))
        return {"metrics": metrics, "grads": grads, "logps": per_sample, "segments": segments,
                "tokens": sum(mb.tokens.numel() for mb in mbs), "microbatches": len(mbs)}

    ref = run({})

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    def compare(new: dict) -> dict:
        return {
            "grad_rel": {n: rel(new["grads"][n], g) for n, g in ref["grads"].items()},
            "metric_rel": {k: abs(new["metrics"][k] - v) / max(abs(v), 1e-30) for k, v in ref["metrics"].items()},
            "logp_keys": (sorted(ref["logps"]) == sorted(new["logps"])) and len(ref["logps"]),
            "logp_rel": [rel(new["logps"][k], v) for k, v in ref["logps"].items()],
            "tokens": (ref["tokens"], new["tokens"]), "microbatches": new["microbatches"],
            "segments": new["segments"],
        }

    result = {name: compare(run(layout)) for name, layout in LAYOUTS.items()}
    result["grad_nonzero"] = all(float(g.abs().max()) > 0 for g in ref["grads"].values())
    result["metrics"] = ref["metrics"]
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(result, out_path)
    else:  # other stages / TP ranks: their gradients too (embedding and first layers live on stage 0 at PP2)
        torch.save(result, f"{out_path}.{torch.distributed.get_rank()}")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_shared_and_packed_steps_equal_unshared(tiny_qwen3_hf, tmp_path, tp, pp):
    out = tmp_path / "result.pt"
    spawn_local(_step_worker, tp * pp, (tiny_qwen3_hf, tp, pp, str(out)))
    last = torch.load(out)
    others = [torch.load(p) for p in tmp_path.glob("result.pt.*")]
    assert len(others) == tp * pp - 1
    assert last["metrics"]["train/tokens"] == 5 + 3 + 7 + 4 + 9 + 2 + 6 + 3 + 5 + 1  # the dropped two are out
    for r in [last, *others]:
        assert r["grad_nonzero"]
    for name in LAYOUTS:
        res = last[name]
        assert res["logp_keys"] == 10 and len(res["metric_rel"]) > 3
        assert res["segments"] == ("-segments" in name)
        ref_tokens, new_tokens = res["tokens"]
        assert new_tokens < ref_tokens
        worst = max(res["metric_rel"].values())
        print(f"\nTP{tp}/PP{pp} {name}: row tokens {ref_tokens} -> {new_tokens} in {res['microbatches']} "
              f"micro-batches; loss metrics max rel diff {worst:.2e}; log-probs {max(res['logp_rel']):.2e}; "
              f"grads max rel diff {max(max(r[name]['grad_rel'].values()) for r in [last, *others]):.2e}")
        assert worst <= REL_TOL, (name, res["metric_rel"])
        assert max(res["logp_rel"]) <= REL_TOL, name
        for r in [last, *others]:
            bad = {n: v for n, v in r[name]["grad_rel"].items() if v > REL_TOL}
            assert not bad, (name, bad)
