"""rollout.reproducible (on by default): every sample draws from its own seed, derived from (seed, step, rank, task,
prompt, sample), on every engine path: the embedded engine seeds each row of a batch, the batcher merges requests
with different seeds, and the pool sends SGLang one request per seeded sample."""
from concurrent.futures import Future

import pytest

from megatron_pz.config import load_config
from megatron_pz.engine.batcher import Batcher
from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.engine.server import RolloutServer, ServerConfig
from megatron_pz.rollout.pool import PoolConfig, RolloutPool, sample_params, seeded
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams
from megatron_pz.rollout.seeds import prompt_seeds, sample_seed
from megatron_pz.trainer.collect import StepContext, sampling_seed

# tiny (a random tiny Llama with a byte tokenizer) and one_thread come from tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def ctx(step=0, rank=0):
    return StepContext(encode=list, decode=str, chat_template=None, step=step, dp_rank=rank)


def ids(groups):
    return [[r.response_ids for r in g] for g in groups]


# ---------------------------------------------------------------------------- the seeds
def test_seeded_by_default_and_unseeded_when_switched_off():
    assert isinstance(sampling_seed(load_config(None, []), ctx(), "predict"), int)
    assert sampling_seed(load_config(None, ["rollout.reproducible=false"]), ctx(), "predict") is None


def test_seeds_differ_by_step_rank_and_task_and_repeat():
    cfg = load_config(None, [])
    s = sampling_seed(cfg, ctx(3, 1), "predict")
    assert s == sampling_seed(cfg, ctx(3, 1), "predict")  # a resumed run sends the same seed
    others = {sampling_seed(cfg, ctx(4, 1), "predict"), sampling_seed(cfg, ctx(3, 0), "predict"),
              sampling_seed(cfg, ctx(3, 1), "mask_gen")}
    assert s not in others and len(others) == 3 and all(0 <= x < 2**31 for x in others | {s})
    other_seed = load_config(None, ["train.seed=7"])
    assert sampling_seed(other_seed, ctx(3, 1), "predict") != s


def test_prompt_and_sample_seeds_hand_computed():
    assert prompt_seeds(10, 3) == [10, 11, 12]
    assert prompt_seeds(2**31 - 1, 2) == [2**31 - 1, 0]  # stays a 31-bit seed
    assert prompt_seeds(None, 2) == [None, None]
    # sample 0 keeps the prompt's seed (so a one-sample request uses its seed as is); the others: crc32("5/j")
    assert [sample_seed(5, j) for j in range(3)] == [5, 505660990, 120231812]
    assert sample_seed(None, 4) is None


def test_each_request_of_a_batch_keeps_its_prompts_streams():
    base = SamplingParams(n=4, max_new_tokens=8, seed=10)
    assert seeded(base, 0) is base and seeded(base, 3).seed == 13 and seeded(base, 3).n == 4
    assert seeded(SamplingParams(n=4, max_new_tokens=8, seed=2**31 - 1), 2).seed == 1
    unseeded = SamplingParams(n=4, max_new_tokens=8)
    assert seeded(unseeded, 5) is unseeded
    # one sample sent alone: n = 1, seeded with that sample's own seed
    alone = sample_params(base, 2, 1)
    assert alone.n == 1 and alone.seed == sample_seed(12, 1) and alone.max_new_tokens == 8


# ---------------------------------------------------------------------------- the embedded engine
@pytest.fixture(scope="module")
def engine(tiny):
    return EmbeddedEngine(tiny, max_batch_size=64)


def prompts_of(engine):
    tok = engine.tokenizer
    return [tok("The capital of France").input_ids, tok("ab").input_ids, tok("x y z, then").input_ids]


def test_a_seeded_group_differs_and_a_rerun_repeats_it(engine):
    prompts = prompts_of(engine)
    params = SamplingParams(n=4, max_new_tokens=10, seed=123)
    first, again = engine.generate(prompts, params), engine.generate(prompts, params)
    # one base seed for the whole batch, yet the 4 samples of every prompt are 4 different responses
    assert all(len({tuple(r.response_ids) for r in g}) == 4 for g in first)
    assert ids(again) == ids(first)
    assert ids(engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, seed=124))) != ids(first)


def test_a_samples_response_does_not_depend_on_its_batch(engine):
    """Sample j of prompt i is the same alone, in a smaller chunk (max_batch_size below n) or batched with others:
    only its seed and its own logits decide it."""
    prompts = prompts_of(engine)
    params = SamplingParams(n=4, max_new_tokens=10, seed=123)
    full = engine.generate(prompts, params)
    alone = engine.generate([prompts[1]], sample_params(params, 1, 2))
    assert ids(alone) == [[full[1][2].response_ids]]
    small = EmbeddedEngine(engine.model_path, max_batch_size=3)
    assert ids(small.generate(prompts, params)) == ids(full)


def test_the_batcher_merges_requests_with_different_seeds():
    calls = []

    class Recording:
        max_batch_size = 64

        def plan_chunks(self, prompts, params):
            rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
            return [rows]

        def generate_chunk(self, prompts, params, chunk, seeds=None):
            calls.append((len(prompts), params.seed, seeds))
            return [GenerationResult(prompt_index=i, response_ids=[], logprobs=[], finish_reason="stop",
                                     weight_version=0) for i, _ in chunk]

    batcher = Batcher(Recording(), window_s=0.5)
    try:
        futures: list[Future] = [batcher.submit([[1], [2]], SamplingParams(n=2, max_new_tokens=4, seed=100)),
                                 batcher.submit([[3]], SamplingParams(n=2, max_new_tokens=4, seed=7))]
        assert [[len(r) for r in f.result(timeout=30)] for f in futures] == [[2, 2], [2]]
    finally:
        batcher.stop()
    assert calls == [(3, None, [100, 101, 7])]  # one engine call; every prompt keeps its request's stream


# ---------------------------------------------------------------------------- the pool (SGLang's path)
def test_split_seeded_sends_one_request_per_sample_and_regroups():
    sent = []

    class Client:
        base_url = "http://fake:1"

        def generate(self, prompts, params):
            sent.append((tuple(map(tuple, prompts)), params.n, params.seed))
            return [[GenerationResult(prompt_index=0, response_ids=[params.seed], logprobs=[0.0],
                                      finish_reason="stop", weight_version=0)]]

    pool = RolloutPool(["http://fake:1"], PoolConfig(split_seeded=True))
    pool.servers[0].client = Client()
    try:
        out = pool.generate([[1], [2]], SamplingParams(n=3, max_new_tokens=4, seed=50))
    finally:
        pool.close()
    want = [[sample_seed(50, j) for j in range(3)], [sample_seed(51, j) for j in range(3)]]
    assert sorted(sent) == sorted([((p,), 1, s) for p, seeds in zip([(1,), (2,)], want) for s in seeds])
    assert [[r.response_ids[0] for r in g] for g in out] == want
    assert [[r.prompt_index for r in g] for g in out] == [[0, 0, 0], [1, 1, 1]]


def test_split_and_grouped_requests_draw_the_same_responses_from_the_embedded_server(tiny, tmp_path):
    """What SGLang needs (one request per seeded sample) and what the embedded server is sent (one per group)
    give the same samples: the seed layout is the same on both paths."""
    server = RolloutServer(EmbeddedEngine(tiny, max_batch_size=64), ServerConfig(port=0)).start()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    params = SamplingParams(n=3, max_new_tokens=8, seed=77)
    try:
        grouped, split = RolloutPool([server.url]), RolloutPool([server.url], PoolConfig(split_seeded=True))
        a, b = grouped.generate(prompts, params), split.generate(prompts, params)
        grouped.close(), split.close()
    finally:
        server.stop()
    assert ids(a) == ids(b)
    assert all(len({tuple(r.response_ids) for r in g}) == 3 for g in a)
