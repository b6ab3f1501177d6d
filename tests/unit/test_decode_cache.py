"""The in-place KV cache (engine/decode.py) gives the embedded engine the very samples of transformers' DynamicCache."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from megatron_pz.engine.decode import PreallocatedLayer, preallocated_cache
from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.rollout.protocol import SamplingParams

NUM_GPUS = 0
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tiny):
    return EmbeddedEngine(tiny, max_batch_size=16)


def _prompts(engine):
    tok = engine.tokenizer  # different lengths: left padding; "ab" twice: a shared prefill and a row of its own
    return [tok("The capital of France").input_ids, tok("ab").input_ids, tok("x y z, then").input_ids,
            tok("ab").input_ids]


def _both(engine, prompts, params, seeds=None):
    """(DynamicCache results, in-place results), flattened. Unseeded rows sample from torch's global generator:
    it starts from the same state for both."""
    out = []
    for pre in (False, True):
        engine.preallocated_kv = pre
        torch.manual_seed(0)
        out.append([r for g in engine.generate(prompts, params, seeds=seeds) for r in g])
    engine.preallocated_kv = True
    return out


def _assert_same(old, new):
    assert len(old) == len(new)
    for a, b in zip(old, new):
        assert (a.response_ids, a.finish_reason, a.matched_stop, a.text) == \
               (b.response_ids, b.finish_reason, b.matched_stop, b.text)
        assert len(b.logprobs) == len(b.response_ids)
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) <= 1e-6


@pytest.mark.parametrize("params", [
    SamplingParams(n=3, max_new_tokens=20, ignore_eos=True, seed=0),
    SamplingParams(n=3, max_new_tokens=20, ignore_eos=True, seed=11, temperature=0.7, top_p=0.9),
    SamplingParams(n=2, max_new_tokens=20, ignore_eos=True, seed=5, top_k=20),
    SamplingParams(n=2, max_new_tokens=20, ignore_eos=True, temperature=0.0),
    SamplingParams(n=1, max_new_tokens=7, ignore_eos=True, seed=3),  # no prompt repeats: generate prefills all
])
def test_same_samples_as_dynamic_cache(engine, params):
    old, new = _both(engine, _prompts(engine), params)
    _assert_same(old, new)
    assert all(len(r.response_ids) == params.max_new_tokens for r in new)


def test_same_samples_with_per_prompt_seeds_and_unseeded_rows(engine):
    prompts = _prompts(engine)
    params = SamplingParams(n=2, max_new_tokens=12, ignore_eos=True)
    _assert_same(*_both(engine, prompts, params, seeds=[7, None, 9, 123]))  # SeededSampler, one seed drawn
    _assert_same(*_both(engine, prompts, params))  # no seed at all: generate's own multinomial sampling


def test_same_stops_eos_and_lengths(engine):
    prompts = _prompts(engine)
    base = SamplingParams(n=3, max_new_tokens=24, ignore_eos=True, seed=2)
    old, _ = _both(engine, prompts, base)
    tok = engine.tokenizer
    # a stop string and a stop token taken from the middle of real samples, and a token of another sample as EOS
    stop = tok.decode(old[0].response_ids[5:7])
    eos = old[4].response_ids[6]
    before = engine.eos_token_ids
    try:
        engine.eos_token_ids = {eos}
        for params in (SamplingParams(n=3, max_new_tokens=24, seed=2, stop=(stop,)),
                       SamplingParams(n=3, max_new_tokens=24, seed=2, stop_token_ids=(old[2].response_ids[3],)),
                       SamplingParams(n=3, max_new_tokens=24, seed=2),
                       SamplingParams(n=3, max_new_tokens=4, seed=2, ignore_eos=True)):
            o, n = _both(engine, prompts, params)
            _assert_same(o, n)
            assert {r.finish_reason for r in n} >= ({"length"} if params.max_new_tokens == 4 else {"stop"})
    finally:
        engine.eos_token_ids = before


def test_layer_matches_dynamic_layer_through_select_and_crop():
    g = torch.Generator().manual_seed(0)
    kv = lambda b, q: (torch.randn(b, 2, q, 4, generator=g), torch.randn(b, 2, q, 4, generator=g))  # (B, H, q, D)
    dyn, pre = DynamicLayer(), PreallocatedLayer(capacity=9)
    k, v = kv(2, 5)
    for layer in (dyn, pre):
        layer.update(k, v)
        layer.batch_select_indices(torch.tensor([1, 0, 1]))
        layer.batch_repeat_interleave(2)  # (6, H, 5, D)
    for q in (1, 1, 2):
        k, v = kv(6, q)
        a, b = dyn.update(k, v), pre.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert pre.get_seq_length() == dyn.get_seq_length() == 9
    pre.crop(-2)
    assert pre.get_seq_length() == 7 and torch.equal(pre.keys, dyn.keys[:, :, :7])
    with pytest.raises(RuntimeError, match="cannot take position 9"):
        pre.update(*kv(6, 3))


def test_only_full_attention_layers_are_replaced(tiny):
    from transformers import AutoConfig

    cache = preallocated_cache(AutoConfig.from_pretrained(tiny), capacity=8)
    assert cache.layers and all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)


def test_same_samples_with_a_padded_vocabulary(tiny):
    from megatron_pz.engine.model import load_model

    # the tiny model's 260 embedding rows, of which the last 10 pad a 250-id vocabulary (as Megatron pads it)
    engine = EmbeddedEngine(tiny, loaded=load_model(tiny, vocab_size=250))
    old, new = _both(engine, _prompts(engine), SamplingParams(n=3, max_new_tokens=16, ignore_eos=True, seed=4))
    _assert_same(old, new)
    assert max(t for r in new for t in r.response_ids) < 250
