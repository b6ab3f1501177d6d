"""The SGLang client and pool against the embedded server on 127.0.0.1 (in-process, ephemeral port)."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from megatron_pz.errors import RolloutError, UserError
from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.rollout.pool import RolloutPool
from megatron_pz.rollout.protocol import RolloutEngine, SamplingParams
from megatron_pz.engine.server import RolloutServer, ServerConfig
from megatron_pz.rollout.sglang_client import BadResponse, ClientConfig, SGLangClient
from megatron_pz.weight_sync import DiskWeightSync, check_logprobs, check_weights

# tests/tiny_llama.py: pytest puts tests/ on sys.path, as for conftest
from tiny_llama import load_hf, perturbed_state, reference_fn

NUM_GPUS = 0
FAST = ClientConfig(max_retries=1, backoff_s=0.01, generate_timeout_s=60, control_timeout_s=60)

# tiny (a random tiny Llama) and one_thread come from tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def served(tiny, tmp_path):
    """(server, client) with disk updates allowed below tmp_path/weights."""
    (tmp_path / "weights").mkdir()
    engine = EmbeddedEngine(tiny, max_batch_size=16)
    server = RolloutServer(engine, ServerConfig(port=0, weights_dir=str(tmp_path / "weights"))).start()
    yield server, SGLangClient(server.url, FAST)
    server.stop()


def test_generate_over_http_n_samples_finish_reasons_and_limits(served):
    server, client = served
    assert isinstance(client, RolloutEngine) and client.health() and client.weight_version() == 0
    tok = server.engine.tokenizer
    prompts = [tok("hello world").input_ids, tok("abc").input_ids]
    out = client.generate(prompts, SamplingParams(n=3, max_new_tokens=6, temperature=0.9, ignore_eos=True))
    assert [len(g) for g in out] == [3, 3]
    for i, group in enumerate(out):
        for r in group:
            assert r.prompt_index == i and r.finish_reason == "length" and len(r.response_ids) == 6
            assert len(r.logprobs) == 6 and all(lp <= 0 for lp in r.logprobs)
            assert r.weight_version == 0 and r.server == server.url and isinstance(r.text, str)
    # Stop strings through the wire: stop at a token of the greedy path.
    greedy = client.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0][0]
    ids = greedy.response_ids
    k = next(k for k in range(2, len(ids)) if (c := tok.decode([ids[k]])).isascii() and c.strip()
             and c not in tok.decode(ids[:k]))
    stop = tok.decode([ids[k]])
    res = client.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True,
                                                      stop=(stop,)))[0][0]
    assert res.finish_reason == "stop" and res.matched_stop == stop and res.response_ids == ids[:k + 1]


def test_logprobs_over_http_match_forward_pass(served, tiny):
    _, client = served
    report = check_logprobs(client, [5, 6, 7, 8], reference_fn(load_hf(tiny)), max_new_tokens=12, temperature=0.0,
                            atol=1e-4)
    assert report.ok, str(report)


def test_prompt_top_logprobs_over_http_match_forward_pass(served, tiny):
    """SGLang's logprob_start_len=0 + top_logprobs_num: input_token_logprobs / input_top_logprobs, None at token 0;
    the client, the pool and the engine in-process give the same top-K rows as a plain forward pass."""
    import torch

    server, client = served
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    model = load_hf(tiny)
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1) for p in prompts]
    raw = requests.post(f"{server.url}/generate", json={
        "input_ids": prompts[0], "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 3}).json()["meta_info"]
    assert raw["input_token_logprobs"][0] == [None, 5, None] and len(raw["input_token_logprobs"]) == 5
    assert raw["input_top_logprobs"][0] is None and [len(r) for r in raw["input_top_logprobs"][1:]] == [3] * 4
    for t in range(1, 5):
        assert raw["input_token_logprobs"][t][0] == pytest.approx(ref[0][t - 1, prompts[0][t]].item(), abs=1e-5)
        vals, idx = ref[0][t - 1].topk(3)
        assert [e[1] for e in raw["input_top_logprobs"][t]] == idx.tolist()
    pool = RolloutPool([server.url], client_config=FAST)
    for engine in (client, pool, server.engine):
        rows = engine.input_top_logprobs(prompts, 4)
        assert [len(r) for r in rows] == [5, 2] and rows[0][0] == [] and rows[1][0] == []
        for i, p in enumerate(prompts):
            for t in range(1, len(p)):
                assert rows[i][t] == pytest.approx(ref[i][t - 1].topk(4).values.tolist(), abs=1e-5)
    pool.close()
    # the embedded engine serves logprob_start_len -1 (none) and 0 only
    bad = requests.post(f"{server.url}/generate", json={"input_ids": prompts[0], "return_logprob": True,
                                                        "logprob_start_len": 2})
    assert bad.status_code == 400 and "logprob_start_len=2" in bad.json()["error"]["message"]


def test_concurrent_requests_are_batched_and_ordered(served):
    server, _ = served
    pool = RolloutPool([server.url], client_config=FAST)
    prompts = [[i + 1, i + 2, i + 3] for i in range(12)]
    params = SamplingParams(n=2, max_new_tokens=4, temperature=0.0, ignore_eos=True)
    out = pool.generate(prompts, params)
    direct = server.engine.generate(prompts, params)
    assert [[r.response_ids for r in g] for g in out] == [[r.response_ids for r in g] for g in direct]
    assert [g[0].prompt_index for g in out] == list(range(12))
    pool.close()


def test_disk_update_through_http_and_check_mode(served, tiny, tmp_path):
    _, client = served
    weights = tmp_path / "weights"
    state = perturbed_state(tiny, scale=0.3)
    sync = DiskWeightSync(client, weights, hf_config_dir=tiny, keep_last=1)
    report = sync.push(state.items(), 1)
    assert client.weight_version() == 1 and report.num_tensors == len(state)
    assert (weights / "v00000001" / "config.json").is_file()
    assert check_weights(client, state).ok
    perturbed = load_hf(tiny)
    perturbed.load_state_dict(state)
    assert check_logprobs(client, [9, 8, 7], reference_fn(perturbed), atol=1e-4).ok
    assert not check_logprobs(client, [9, 8, 7], reference_fn(load_hf(tiny)), atol=1e-4).ok
    # Versions strictly increase: the sync object refuses, and so does the server.
    with pytest.raises(UserError, match="not above"):
        sync.push(state.items(), 1)
    with pytest.raises(BadResponse, match="strictly increase"):
        client.update_weights_from_disk(str(weights / "v00000001"), 1)
    sync.push(perturbed_state(tiny, scale=0.1, seed=5).items(), 2)
    assert sorted(p.name for p in weights.iterdir()) == ["v00000002"]  # keep_last=1 pruned v1


def test_disk_update_outside_weights_dir_is_forbidden(served, tiny, tmp_path):
    server, client = served
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "weights" / "escape").symlink_to(outside)
    for path in (str(tiny), str(tmp_path / "weights" / ".." / "outside"), str(tmp_path / "weights" / "escape")):
        resp = requests.post(server.url + "/update_weights_from_disk",
                             json={"model_path": path, "weight_version": "1"}, timeout=10)
        assert resp.status_code == 403 and "outside --weights-dir" in resp.json()["error"]["message"]
    with pytest.raises(BadResponse, match="403"):
        client.update_weights_from_disk(str(tiny), 1)
    assert client.weight_version() == 0


def test_corrupt_update_over_http_keeps_old_version(served, tiny, tmp_path):
    from safetensors.torch import save_file

    _, client = served
    bad = tmp_path / "weights" / "v00000003"
    bad.mkdir()
    state = perturbed_state(tiny)
    state["lm_head.weight"] = state["lm_head.weight"][:, :5].clone()
    save_file(state, str(bad / "model.safetensors"))
    before = client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))[0][0]
    with pytest.raises(BadResponse, match="lm_head.weight"):
        client.update_weights_from_disk(str(bad), 3)
    after = client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))[0][0]
    assert client.weight_version() == 0 and after.weight_version == 0
    assert after.response_ids == before.response_ids and after.logprobs == before.logprobs


def test_bad_requests_get_clear_4xx(served):
    server, client = served
    with pytest.raises(BadResponse, match="HTTP 400.*unknown sampling_params key 'foo'"):
        client.request("POST", "/generate", {"input_ids": [[1]], "sampling_params": {"foo": 1}}, timeout_s=10)
    with pytest.raises(BadResponse, match="repetition_penalty"):
        client.request("POST", "/generate", {"input_ids": [[1]], "sampling_params": {"repetition_penalty": 1.2}},
                       timeout_s=10)
    with pytest.raises(BadResponse, match="outside"):
        client.generate([[1, 10**6]], SamplingParams())
    resp = requests.post(server.url + "/generate", data=b"{not json", timeout=10)
    assert resp.status_code == 400 and "invalid JSON" in resp.json()["error"]["message"]
    assert requests.get(server.url + "/nope", timeout=10).status_code == 404
    assert requests.get(server.url + "/generate", timeout=10).status_code == 405
    # Control endpoints answer in SGLang's shapes.
    assert requests.post(server.url + "/release_memory_occupation", json={}, timeout=10).json() is None
    assert requests.post(server.url + "/flush_cache", timeout=10).status_code == 200
    r = requests.post(server.url + "/update_weights_from_tensor", json={"serialized_named_tensors": []}, timeout=10)
    assert r.status_code == 400 and "CUDA IPC" in r.json()["message"]


def test_single_prompt_body_answers_a_single_object(served):
    server, _ = served
    one = requests.post(server.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {
        "max_new_tokens": 2}}, timeout=10).json()
    assert isinstance(one, dict) and len(one["output_ids"]) <= 2
    two = requests.post(server.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {
        "max_new_tokens": 2, "n": 2}}, timeout=10).json()
    assert isinstance(two, list) and len(two) == 2  # n > 1 turns a single prompt into a batch, as in SGLang


def test_non_loopback_without_api_key_is_refused(tiny):
    class _E:
        max_batch_size = 1

    with pytest.raises(UserError, match="without an API key"):
        RolloutServer(_E(), ServerConfig(host="0.0.0.0", port=0))  # type: ignore[arg-type]


def test_api_key_is_required_when_set(tiny):
    engine = EmbeddedEngine(tiny)
    server = RolloutServer(engine, ServerConfig(host="127.0.0.1", port=0, api_key="s3cret")).start()
    try:
        body = {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 2}}
        assert requests.post(server.url + "/generate", json=body, timeout=10).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        r = requests.post(server.url + "/generate", json=body, headers=bad, timeout=10)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        assert requests.get(server.url + "/get_model_info", timeout=10).status_code == 401
        assert requests.get(server.url + "/health_generate", timeout=10).status_code == 200  # probes stay open
        with pytest.raises(BadResponse, match="401"):
            SGLangClient(server.url, FAST).generate([[1, 2]], SamplingParams(max_new_tokens=2))
        ok = SGLangClient(server.url, ClientConfig(api_key="s3cret"))
        assert len(ok.generate([[1, 2]], SamplingParams(max_new_tokens=2))[0]) == 1
    finally:
        server.stop()


def test_pause_abort_over_http(served):
    server, client = served
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", client.generate(
        [[1, 2, 3]], SamplingParams(max_new_tokens=900, temperature=0, ignore_eos=True))[0][0]))
    t.start()
    while not server.engine._lock.locked() and t.is_alive():
        time.sleep(0.001)
    client.pause_generation("abort")
    t.join(timeout=30)
    client.continue_generation()
    assert box["r"].finish_reason == "abort" and len(box["r"].response_ids) < 900
    assert client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))[0][0].finish_reason in ("length", "stop")


def test_pool_fans_out_weight_updates_and_reads_endpoint_file(served, tiny, tmp_path):
    from megatron_pz.rollout.launcher import write_endpoints_file

    server, _ = served
    write_endpoints_file(tmp_path / "endpoints.txt", [server.url])
    pool = RolloutPool.from_endpoints_file(tmp_path / "endpoints.txt", client_config=FAST)
    assert pool.health() and pool.weight_version() == 0
    DiskWeightSync(pool, tmp_path / "weights").push(perturbed_state(tiny).items(), 4)
    assert pool.weight_version() == 4 and server.engine.weight_version() == 4
    assert pool.generate([[1, 2]], SamplingParams(max_new_tokens=2))[0][0].weight_version == 4
    with pytest.raises(RolloutError, match="not above"):
        pool.update_weights_from_disk(str(tmp_path / "weights" / "v00000004"), 4)
    pool.close()


def test_api_key_env_is_not_leaked_into_argv():
    from megatron_pz.rollout.launcher import ServerSpec, server_command

    cmd = server_command(ServerSpec(kind="embedded", model_path="/m", port=1, api_key="k"))
    assert "k" not in cmd and "--api-key" not in cmd


def test_a_bad_prompt_does_not_fail_requests_batched_with_it(served):
    _, client = served
    box = {}

    def good():
        box["good"] = client.generate([[1, 2, 3]] * 4, SamplingParams(max_new_tokens=30, ignore_eos=True))

    t = threading.Thread(target=good)
    t.start()
    with pytest.raises(BadResponse, match="outside"):
        client.generate([[1, 10**6]], SamplingParams(max_new_tokens=30, ignore_eos=True))
    t.join(timeout=60)
    assert all(len(r.response_ids) == 30 for g in box["good"] for r in g)


def test_validation_errors_answer_400_naming_the_field(served):
    server, _ = served
    cases = [
        ("/init_weights_update_group", {"master_address": "h", "master_port": "x", "rank_offset": 1, "world_size": 2},
         "master_port"),
        ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"]}, "shapes"),
        ("/generate", {"input_ids": [1, "2"]}, "input_ids"),
        ("/generate", [1, 2], "must be an object"),
    ]
    for path, body, field in cases:
        r = requests.post(server.url + path, json=body, timeout=10)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (path, r.status_code, r.text)


def test_api_key_is_checked_before_the_body_is_read(tiny):
    import socket

    server = RolloutServer(EmbeddedEngine(tiny), ServerConfig(port=0, api_key="s3cret")).start()
    try:
        # Announce a 100 MB body and send one byte: the 401 comes back without the server waiting for the rest.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000000\r\n\r\n{")
            assert s.recv(1024).startswith(b"HTTP/1.1 401")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # authenticated: size cap
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                      b"Content-Length: 300000000\r\n\r\n{")
            assert s.recv(1024).startswith(b"HTTP/1.1 413")
    finally:
        server.stop()
