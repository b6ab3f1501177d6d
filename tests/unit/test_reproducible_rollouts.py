"""rollout.reproducible: every request carries its own sampling seed, derived from (seed, step, rank, task, prompt)."""
from megatron_pz.config import load_config
from megatron_pz.rollout.pool import seeded
from megatron_pz.rollout.protocol import SamplingParams
from megatron_pz.trainer.collect import StepContext, sampling_seed


def ctx(step=0, rank=0):
    return StepContext(encode=list, decode=str, chat_template=None, step=step, dp_rank=rank)


def test_no_seed_unless_asked():
    assert sampling_seed(load_config(None, []), ctx(), "predict") is None


def test_seeds_differ_by_step_rank_and_task_and_repeat():
    cfg = load_config(None, ["rollout.reproducible=true"])
    s = sampling_seed(cfg, ctx(3, 1), "predict")
    assert s == sampling_seed(cfg, ctx(3, 1), "predict")  # a resumed run sends the same seed
    others = {sampling_seed(cfg, ctx(4, 1), "predict"), sampling_seed(cfg, ctx(3, 0), "predict"),
              sampling_seed(cfg, ctx(3, 1), "mask_gen")}
    assert s not in others and len(others) == 3 and all(0 <= x < 2**31 for x in others | {s})
    other_seed = load_config(None, ["rollout.reproducible=true", "train.seed=7"])
    assert sampling_seed(other_seed, ctx(3, 1), "predict") != s


def test_each_request_of_a_batch_gets_its_own_stream():
    base = SamplingParams(n=4, max_new_tokens=8, seed=10)
    assert seeded(base, 0) is base and seeded(base, 3).seed == 13 and seeded(base, 3).n == 4
    assert seeded(SamplingParams(n=4, max_new_tokens=8, seed=2**31 - 1), 2).seed == 1  # stays a 31-bit seed
    unseeded = SamplingParams(n=4, max_new_tokens=8)
    assert seeded(unseeded, 5) is unseeded
