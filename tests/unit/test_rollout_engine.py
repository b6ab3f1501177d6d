"""Embedded engine in-process: logprobs equal an independent forward pass, SGLang stop semantics, atomic updates."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from megatron_pz.errors import CheckpointError, ConfigError, RolloutError
from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.engine.weights import read_safetensors_dir
from megatron_pz.rollout.protocol import SamplingParams
from megatron_pz.types import Sample, Status, Task

# tests/tiny_llama.py: pytest puts tests/ on sys.path, as for conftest
from tiny_llama import load_hf, perturbed_state, reference_logprobs

NUM_GPUS = 0

# tiny (a random tiny Llama) and one_thread come from tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_model(tiny):
    return load_hf(tiny)


@pytest.fixture()
def engine(tiny):
    return EmbeddedEngine(tiny, max_batch_size=8)


def _prompts(engine):
    tok = engine.tokenizer
    # Different lengths: exercises left padding inside one batch.
    return [tok("The capital of France").input_ids, tok("ab").input_ids, tok("x y z, then").input_ids]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 0.9), (1.3, 1.0)])
def test_logprobs_match_independent_forward(engine, hf_model, temperature, top_p):
    prompts = _prompts(engine)
    out = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=12, temperature=temperature, top_p=top_p))
    assert [len(g) for g in out] == [3, 3, 3]
    worst = 0.0
    for i, group in enumerate(out):
        for res in group:
            assert res.prompt_index == i and len(res.logprobs) == len(res.response_ids) > 0
            ref = reference_logprobs(hf_model, prompts[i], res.response_ids, temperature)
            worst = max(worst, float((ref - torch.tensor(res.logprobs)).abs().max()))
    assert worst < 1e-4, f"max |engine - forward| = {worst}"


def test_n_samples_length_and_max_new_tokens(engine):
    out = engine.generate(_prompts(engine), SamplingParams(n=4, max_new_tokens=5, temperature=1.0, ignore_eos=True))
    for group in out:
        assert len(group) == 4
        for res in group:
            assert len(res.response_ids) == 5 and res.finish_reason == "length" and res.status == Status.TRUNCATED
    # Sampling differs between the n samples of one prompt (260-token vocabulary, 5 tokens).
    assert len({tuple(r.response_ids) for r in out[0]}) > 1


def test_stop_string_and_stop_token_keep_the_ending_token(engine):
    prompt = _prompts(engine)[0]
    greedy = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True))[0][0]
    ids = greedy.response_ids
    tok = engine.tokenizer
    # A printable single-byte token not seen earlier in the response: a stop string that must end there.
    k = next(k for k in range(2, len(ids)) if (c := tok.decode([ids[k]])).isascii() and c.strip()
             and c not in tok.decode(ids[:k]))
    stop = tok.decode([ids[k]])
    res = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True,
                                                   stop=(stop,)))[0][0]
    assert res.finish_reason == "stop" and res.matched_stop == stop
    assert res.response_ids == ids[:k + 1]  # SGLang keeps the token completing the stop string in output_ids
    assert res.text == tok.decode(ids[:k])  # ...and trims the text before the stop string
    res = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True,
                                                   stop_token_ids=(ids[3],)))[0][0]
    first = ids.index(ids[3])
    assert res.finish_reason == "stop" and res.matched_stop == ids[3] and res.response_ids == ids[:first + 1]
    assert len(res.logprobs) == len(res.response_ids)


def test_eos_finishes_with_stop_unless_ignored(engine):
    # A random tiny model rarely samples EOS; declare a token of the greedy path to be EOS instead.
    prompt = _prompts(engine)[2]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    ids = engine.generate([prompt], params)[0][0].response_ids
    engine.eos_token_ids = {ids[4]}
    res = engine.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0.0))[0][0]
    end = ids.index(ids[4])
    assert res.finish_reason == "stop" and res.matched_stop == ids[4] and res.response_ids == ids[:end + 1]
    assert res.text == engine.tokenizer.decode(ids[:end])  # the EOS token is not part of the text
    assert engine.generate([prompt], params)[0][0].response_ids == ids  # ignore_eos


def test_invalid_requests_name_the_problem(engine):
    with pytest.raises(ConfigError, match="outside"):
        engine.generate([[1, 99999]], SamplingParams())
    with pytest.raises(ConfigError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=5000))
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_disk_update_switches_to_new_weights_and_versions_increase(engine, tiny, tmp_path, hf_model):
    import copy

    from safetensors.torch import save_file

    state = perturbed_state(tiny, scale=0.2)
    (tmp_path / "v1").mkdir()
    save_file(state, str(tmp_path / "v1" / "model.safetensors"))
    prompt = _prompts(engine)[0]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    before = engine.generate([prompt], params)[0][0]
    engine.update_weights_from_disk(str(tmp_path / "v1"), 1)
    after = engine.generate([prompt], params)[0][0]
    assert (before.weight_version, after.weight_version, engine.weight_version()) == (0, 1, 1)
    perturbed = copy.deepcopy(hf_model)
    perturbed.load_state_dict(state)
    ref_new = reference_logprobs(perturbed, prompt, after.response_ids, 0.0)
    ref_old = reference_logprobs(hf_model, prompt, after.response_ids, 0.0)
    assert float((ref_new - torch.tensor(after.logprobs)).abs().max()) < 1e-4
    assert float((ref_old - torch.tensor(after.logprobs)).abs().max()) > 1e-3  # really different weights
    for stale in (0, 1):
        with pytest.raises(RolloutError, match="strictly increase"):
            engine.update_weights_from_disk(str(tmp_path / "v1"), stale)


def _bad_checkpoint(kind: str, tiny, path):
    from safetensors.torch import save_file

    path.mkdir()
    state = perturbed_state(tiny)
    if kind == "shape":
        state["model.norm.weight"] = state["model.norm.weight"][:-1].clone()
    elif kind == "missing":
        del state["model.layers.1.mlp.down_proj.weight"]
    elif kind == "unexpected":
        state["model.layers.9.mlp.down_proj.weight"] = torch.zeros(2)
    elif kind == "nan":
        state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, str(path / "model.safetensors"))
    if kind == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
    return path


@pytest.mark.parametrize("kind,match", [
    ("shape", "model.norm.weight"), ("missing", "down_proj"), ("unexpected", "layers.9"),
    ("nan", "NaN"), ("truncated", "cannot read"), ("garbage", "cannot read"),
])
def test_bad_checkpoint_is_rejected_and_old_weights_keep_serving(engine, tiny, tmp_path, kind, match):
    prompt = _prompts(engine)[1]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    before = engine.generate([prompt], params)[0][0]
    with pytest.raises(CheckpointError, match=match):
        engine.update_weights_from_disk(str(_bad_checkpoint(kind, tiny, tmp_path / kind)), 5)
    after = engine.generate([prompt], params)[0][0]
    assert engine.weight_version() == 0 and after.weight_version == 0
    assert after.response_ids == before.response_ids and after.logprobs == before.logprobs


def test_inflight_generation_finishes_on_old_weights(engine, tiny, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "v1").mkdir()
    save_file(perturbed_state(tiny, scale=0.5), str(tmp_path / "v1" / "model.safetensors"))
    prompt = _prompts(engine)[0]
    params = SamplingParams(max_new_tokens=80, temperature=0.0, ignore_eos=True)
    reference = engine.generate([prompt], params)[0][0]
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("res", engine.generate([prompt], params)[0][0]))
    t.start()
    deadline = time.monotonic() + 30
    while not engine._lock.locked() and time.monotonic() < deadline:  # wait until the generation runs
        time.sleep(0.001)
    engine.update_weights_from_disk(str(tmp_path / "v1"), 1)  # validated meanwhile; swaps after it finishes
    t.join()
    assert box["res"].weight_version == 0 and box["res"].response_ids == reference.response_ids
    assert engine.generate([prompt], params)[0][0].weight_version == 1


def test_pause_abort_returns_partial_samples_marked_abort(engine):
    prompt = _prompts(engine)[0]
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("res", engine.generate(
        [prompt], SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True))[0][0]))
    t.start()
    deadline = time.monotonic() + 30
    while not engine._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)
    engine.pause_generation("abort")
    t.join(timeout=30)
    engine.continue_generation()
    res = box["res"]
    assert res.finish_reason == "abort" and res.status == Status.ABORTED and 0 < len(res.response_ids) < 900
    assert len(res.logprobs) == len(res.response_ids)


def test_fill_sample_maps_finish_reason_to_status(engine):
    from megatron_pz.rollout.protocol import fill_sample

    res = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0][0]
    sample = fill_sample(Sample(task=Task.MASK_PRED, group_id="g", prompt_ids=[5, 6, 7]), res)
    assert sample.status == Status.TRUNCATED and sample.rollout_logprobs == res.logprobs
    assert sample.weight_version == 0 and sample.response_ids == res.response_ids


def test_read_safetensors_dir_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_safetensors_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        read_safetensors_dir(tmp_path / "empty")


def test_fill_sample_refuses_unversioned_or_mixed_results():
    from megatron_pz.rollout.protocol import GenerationResult, fill_sample

    partial = GenerationResult(0, [1], [-0.5], "length", weight_version=-1)
    mixed = GenerationResult(0, [1], [-0.5], "stop", weight_version=3, mixed_versions=True)
    for res in (partial, mixed):
        assert fill_sample(Sample(task=Task.MASK_GEN, group_id="g"), res).status == Status.ABORTED
