"""The embedded rollout engine's log-probs vs the Megatron trainer's recomputed log-probs on the same tokens.

SmolLM2-135M, fp32: the engine (HF transformers, KV-cached sampling) reports log softmax(logits / T) of each
sampled token; the trainer recomputes it through Megatron's vocab-parallel path at TP=1 and TP=3, and at TP=1 with
shared-prompt rows (``train.shared_prompt``: each prompt's two responses in one row). The PPO ratio is
exp(difference), so this is how far from 1 an on-policy ratio can be. Max and mean are printed.
"""
import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc
TEMPERATURE = 0.8


def _trainer_logprobs_worker(mcore_dir: str, samples_path: str, tp: int, shared: bool, out_path: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_pz import checkpoint as ckpt
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.step import forward_logprobs

    par = ParallelConfig(tensor_model_parallel_size=tp)
    init_distributed(par)
    arch = ckpt.read_arch(mcore_dir)
    model = build_model(arch, ModelConfig(dtype="fp32"), par, masked_rows=shared)
    ckpt.load(mcore_dir, model, arch)
    samples = torch.load(samples_path, weights_only=False)
    mbs = build_microbatches(samples, micro_batch_size=4, shared_prompt=shared)
    logps = forward_logprobs(model, mbs, arch.vocab_size, TEMPERATURE)
    if ps.get_tensor_model_parallel_rank() == 0:
        diffs = torch.cat([(lp - mb.rollout_logprobs)[mb.loss_mask > 0].abs() for lp, mb in zip(logps, mbs)])
        torch.save(diffs, out_path)


@pytest.fixture(scope="module")
def engine_samples(smollm2, tmp_path_factory):
    """8 responses (4 prompts x n=2, up to 24 tokens, T=0.8) sampled by the embedded engine."""
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.rollout.protocol import SamplingParams, fill_sample
    from megatron_pz.types import Sample, Status, Task

    hf_dir, _ = smollm2
    engine = EmbeddedEngine(hf_dir, dtype="float32")
    tok = engine.tokenizer
    texts = ["The Eiffel Tower is located in", "Photosynthesis is the process by which",
             "The French Revolution began in", "In 1969, the Apollo 11 mission"]
    prompts = [tok.encode(t) for t in texts]
    results = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=24, temperature=TEMPERATURE, seed=0))
    samples = []
    for ids, group in zip(prompts, results):
        for r in group:
            s = fill_sample(Sample(task=Task.MASK_PRED, group_id="g", prompt_ids=list(ids)), r)
            s.status, s.advantage = Status.COMPLETED, 0.0
            samples.append(s)
    path = tmp_path_factory.mktemp("engine") / "samples.pt"
    torch.save(samples, path)
    return path


@pytest.mark.parametrize("tp,shared", [(1, False), (3, False), (1, True)])
def test_engine_logprobs_match_megatron(smollm2, engine_samples, tmp_path, tp, shared):
    out = tmp_path / "diffs.pt"
    spawn_local(_trainer_logprobs_worker, tp, (smollm2[1], str(engine_samples), tp, shared, str(out)))
    diffs = torch.load(out)
    print(f"\nSmolLM2-135M engine vs Megatron TP{tp}{' shared-prompt' if shared else ''} (T={TEMPERATURE}): "
          f"max |dlogp| {diffs.max():.2e}, "
          f"mean {diffs.mean():.2e} over {diffs.numel()} tokens")
    assert diffs.numel() >= 8
    assert diffs.max() < 1e-3 and diffs.mean() < 1e-4
