"""The embedded server refuses abuse cleanly: malformed bodies answer 4xx naming the culprit (never 500), limits
are checked before expensive work, and one big request does not starve a small one."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import Future

import pytest
import requests

from megatron_pz.engine import strict_json
from megatron_pz.engine.batcher import Batcher
from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.engine.server import RolloutServer, ServerConfig
from megatron_pz.engine.wire import HTTPError, parse_sampling_params
from megatron_pz.errors import UserError
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread and tiny come from tests/conftest.py

LIMITS = {"max_n": 8, "max_prompt_chars": 1000, "max_prompt_tokens": 64, "max_body_bytes": 1 << 20, "body_timeout_s": 0.5}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """One server with small limits for every HTTP test here (they only read from it)."""
    weights = tmp_path_factory.mktemp("weights")
    srv = RolloutServer(EmbeddedEngine(tiny, max_batch_size=4),
                        ServerConfig(port=0, weights_dir=str(weights), **LIMITS)).start()
    srv.test_weights_dir = weights
    yield srv
    srv.stop()


def post(server, path: str, body: bytes | dict | list) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.url + path, data=data, timeout=30)


def raw_http(server, head: bytes, body: bytes, read_timeout_s: float = 10) -> bytes:
    """What the server answers to a hand-written request (what ``requests`` cannot send)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout_s) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or (b"content-length" in answer and not answer.endswith(b"}")):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


# ------------------------------------------------------------------------------------------------ strict JSON

@pytest.mark.parametrize("body, message", [
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"a": 1e999}', "1e999 overflows a float"),
    (b'{"a": ' + b"9" * 5000 + b"}", "an integer of 5000 digits"),
    (b"[" * 100000, "nested more than 32 levels"),
    (b"[" * 33 + b"]" * 33, "nested more than 32 levels"),
    (b'{"a": "\xff"}', "not UTF-8 (byte 7"),
    (b'{"a": 1, "b": {"c": 1, "c": 2}}', "key 'c' appears twice"),
    (b'{"a": 1', "Expecting ',' delimiter (at character 7)"),
])
def test_strict_json_refuses_what_no_client_means(body, message):
    with pytest.raises(strict_json.BadJSON, match=message.replace("(", r"\(").replace(")", r"\)")):
        strict_json.loads(body)


def test_strict_json_reads_ordinary_bodies():
    assert strict_json.loads(b'{"a": [1, -2.5, "[[[{{"], "b": {"c": null}}') == {"a": [1, -2.5, "[[[{{"],
                                                                                 "b": {"c": None}}
    deep_but_legal = b"[" * 32 + b"]" * 32
    assert strict_json.loads(deep_but_legal) is not None
    in_strings = '[[{"k": "' + "]" * 50 + "[" * 50 + '\\"["}], [[]]]'  # brackets inside strings do not count
    assert strict_json._max_depth(in_strings) == 3 and strict_json.loads(in_strings)[1] == [[]]


# ------------------------------------------------------------------------------------------------ sampling_params

@pytest.mark.parametrize("raw, message", [
    ({"max_new_tokens": "x"}, "sampling_params.max_new_tokens must be an integer, got 'x'"),
    ({"max_new_tokens": 2.5}, "sampling_params.max_new_tokens must be an integer"),
    ({"max_new_tokens": 0}, "sampling_params.max_new_tokens must be >= 1, got 0"),
    ({"temperature": [1]}, "sampling_params.temperature must be a finite number, got [1]"),
    ({"temperature": True}, "sampling_params.temperature must be a finite number"),
    ({"temperature": float("nan")}, "sampling_params.temperature must be a finite number"),
    ({"temperature": -1}, "sampling_params.temperature must be >= 0"),
    ({"top_p": 0}, "sampling_params.top_p must be in (0, 1]"),
    ({"top_k": 0}, "sampling_params.top_k must be -1"),
    ({"n": 0}, "sampling_params.n must be >= 1, got 0"),
    ({"n": 10000}, "sampling_params.n=10000 exceeds this server's limit of 8"),
    ({"stop": [1]}, "sampling_params.stop must be a string or a list of strings"),
    ({"stop_token_ids": "abc"}, "sampling_params.stop_token_ids must be a list of token ids"),
    ({"stop_token_ids": [-1]}, "sampling_params.stop_token_ids must be a list of token ids"),
    ({"sampling_seed": 2**70}, "sampling_params.sampling_seed must be an integer in [0, 2**63)"),
    ({"ignore_eos": "false"}, "sampling_params.ignore_eos must be true or false, got 'false'"),
    ({"skip_special_tokens": 1}, "sampling_params.skip_special_tokens must be true or false"),
    ({"min_p": "x" * 10**6}, "sampling_params.min_p='xxxxx"),
])
def test_sampling_params_of_the_wrong_type_or_range_are_named(raw, message):
    with pytest.raises(HTTPError) as err:
        parse_sampling_params(raw, max_n=8)
    assert err.value.status == 400 and message in str(err.value) and len(str(err.value)) < 300, str(err.value)


def test_sampling_params_defaults_and_sglang_values_still_parse():
    assert parse_sampling_params(None) == SamplingParams()
    p = parse_sampling_params({"n": 8, "max_new_tokens": 5, "temperature": 1, "top_p": 0.5, "top_k": 1 << 30,
                               "stop": "x", "stop_token_ids": [3], "ignore_eos": True, "sampling_seed": 7,
                               "min_p": 0.0, "logit_bias": {}, "spaces_between_special_tokens": False}, max_n=8)
    assert p == SamplingParams(n=8, max_new_tokens=5, temperature=1.0, top_p=0.5, top_k=-1, stop=("x",),
                               stop_token_ids=(3,), ignore_eos=True, seed=7)


def test_server_config_limits_must_be_positive():
    with pytest.raises(UserError, match="--max-n must be a positive integer, got 0"):
        ServerConfig(max_n=0)
    with pytest.raises(UserError, match="body_timeout_s must be > 0"):
        ServerConfig(body_timeout_s=0)


# ------------------------------------------------------------------------------------------------ over HTTP

GOOD = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}


@pytest.mark.parametrize("body, status, message", [
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "x"}}, 400, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": [1]}}, 400, "sampling_params.temperature"),
    ({"input_ids": [1, 2], "sampling_params": {"stop": [1]}}, 400, "sampling_params.stop"),
    ({"input_ids": [1, 2], "sampling_params": {"sampling_seed": "x"}}, 400, "sampling_params.sampling_seed"),
    ({"input_ids": [1, 2], "sampling_params": {"n": 0}}, 400, "sampling_params.n must be >= 1"),
    ({"input_ids": [1, 2], "sampling_params": {"n": 10000}}, 400, "sampling_params.n=10000 exceeds"),
    ({"input_ids": [1, 2], "logprob_start_len": []}, 400, "logprob_start_len must be an integer or a list"),
    ({"input_ids": [1] * 65}, 400, "input_ids[0]: 65 tokens exceed this server's limit of 64"),
    ({"input_ids": [[1], [1] * 65]}, 400, "input_ids[1]: 65 tokens exceed"),
    ({"text": ["ab", "x" * 70]}, 400, "text[1]: 70 tokens exceed this server's limit of 64"),
    (b'{"input_ids": [1, 2], "sampling_params": {"temperature": NaN}}', 400, "NaN is not a JSON number"),
    (b'{"input_ids": [1, 2], "sampling_params": {"temperature": Infinity}}', 400, "Infinity is not a JSON"),
    (b'{"input_ids": [1, 2], "sampling_params": {"top_p": 1e999}}', 400, "1e999 overflows a float"),
    (b"[" * 100000, 400, "nested more than 32 levels"),
    (b'{"input_ids": [1, 2], "text": "\xff"}', 400, "not UTF-8"),
    (b'{"input_ids": [1], "input_ids": [2]}', 400, "key 'input_ids' appears twice"),
    (b"x" * (2 << 20), 413, "exceeds 1048576"),
])
def test_malformed_generate_requests_answer_4xx_naming_the_culprit(server, body, status, message):
    r = post(server, "/generate", body)
    assert r.status_code == status and message in r.json()["error"]["message"], (r.status_code, r.text[:300])
    assert post(server, "/generate", GOOD).status_code == 200  # and the server keeps serving


def test_a_huge_text_prompt_is_refused_before_it_is_tokenised(server, monkeypatch):
    calls = []
    monkeypatch.setattr(server.engine.tokenizer, "encode", lambda text, *a, **k: calls.append(text) or [1])
    r = post(server, "/generate", {"text": ["ok", "x" * 1001]})
    assert r.status_code == 400 and "text[1]: 1001 characters exceed this server's limit of 1000" \
        in r.json()["error"]["message"]
    assert calls == []  # not even the short prompt before it was tokenised


@pytest.mark.parametrize("head, status", [
    (b"Content-Length: x\r\n", b"400"),
    (b"Content-Length: -1\r\n", b"400"),
    (b"Content-Length: 2\r\nContent-Length: 3\r\n", b"400"),
])
def test_bad_content_length_answers_400(server, head, status):
    assert raw_http(server, head, b"{}").startswith(b"HTTP/1.1 " + status)


def test_a_body_shorter_than_its_content_length_answers_408_after_the_body_timeout(server):
    t0 = time.monotonic()
    answer = raw_http(server, b"Content-Length: 100\r\n", b'{"input_ids": [1]')
    assert answer.startswith(b"HTTP/1.1 408") and b"17 bytes of the 100 announced" in answer
    assert time.monotonic() - t0 < 5  # body_timeout_s=0.5, not forever


def test_weights_paths_must_be_text_below_the_weights_dir(server, tmp_path):
    inside = str(server.test_weights_dir)
    cases = [
        ({"model_path": inside + "/v1\x00/etc/passwd"}, 400, "contains a NUL character"),
        (b'{"model_path": "' + inside.encode() + b'/\\udc80", "weight_version": "1"}', 400, "is not valid UTF-8"),
        (b'{"model_path": "' + inside.encode() + b'/\xc0\xaf", "weight_version": "1"}', 400, "not UTF-8"),
        ({"model_path": inside + "/../../../etc"}, 403, "outside --weights-dir"),
        ({"model_path": "relative/../../x"}, 403, "outside --weights-dir"),
        ({"model_path": ""}, 400, "model_path (string) is required"),
        ({"model_path": ["a"]}, 400, "model_path"),
    ]
    for body, status, message in cases:
        if isinstance(body, dict):
            body = {**body, "weight_version": "1"}
        r = post(server, "/update_weights_from_disk", body)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.status_code, r.text)
    assert server.engine.weight_version() == 0


def test_other_endpoints_refuse_bad_values_with_400(server):
    cases = [
        ("/init_weights_update_group", {"master_address": "", "master_port": 1, "rank_offset": 0,
                                        "world_size": 1}, "master_address must be a host name"),
        ("/init_weights_update_group", {"master_address": "h", "master_port": 70000, "rank_offset": 1,
                                        "world_size": 2}, "master_port must be in [1, 65535]"),
        ("/init_weights_update_group", {"master_address": "h", "master_port": 1, "rank_offset": 2,
                                        "world_size": 2}, "0 <= rank_offset < world_size"),
        ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["cuda"], "shapes": [[1]]},
         "dtypes[0]='cuda' is not a tensor dtype"),
        ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[-1]]},
         "shapes[0]=[-1] has a negative dimension"),
        ("/get_weights_by_name", b'{"name": "x", "truncate_size": 1e999}', "1e999 overflows"),
        ("/get_weights_by_name", {"name": "x", "truncate_size": "many"}, "truncate_size"),
    ]
    for path, body, message in cases:
        r = post(server, path, body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.status_code, r.text)


# ------------------------------------------------------------------------------------------------ fairness

class ChunkedFake:
    """An engine of ``plan_chunks``/``generate_chunk`` that records the order chunks run in; the first chunk
    waits for ``release`` so a test can submit more work while the engine is busy."""

    max_batch_size = 2

    def __init__(self):
        self.calls: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def plan_chunks(self, prompts, params):
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        return [rows[k:k + self.max_batch_size] for k in range(0, len(rows), self.max_batch_size)]

    def generate_chunk(self, prompts, params, chunk):
        self.calls.append(f"{params.max_new_tokens}:{len(chunk)}")
        self.started.set()
        self.release.wait(10)
        return [GenerationResult(prompt_index=i, response_ids=[j], logprobs=[0.0], finish_reason="length",
                                 weight_version=0) for i, j in chunk]


def test_batcher_gives_a_newcomer_the_next_turn():
    engine = ChunkedFake()
    batcher = Batcher(engine, window_s=0.001)
    try:
        big = batcher.submit([[1]], SamplingParams(n=8, max_new_tokens=100))  # 4 chunks of 2 rows
        assert engine.started.wait(10)
        small = batcher.submit([[2]], SamplingParams(n=1, max_new_tokens=2))  # queued during the big one's chunk
        engine.release.set()
        assert [r.response_ids for r in small.result(10)[0]] == [[0]]
        assert [r.response_ids for r in big.result(10)[0]] == [[j] for j in range(8)]
        assert engine.calls == ["100:2", "2:1", "100:2", "100:2", "100:2"]
    finally:
        engine.release.set()
        batcher.stop()


def test_cancelled_work_is_skipped_and_does_not_kill_the_batcher():
    engine = ChunkedFake()
    batcher = Batcher(engine, window_s=0.001)
    try:
        blocker = batcher.submit([[1]], SamplingParams(n=2, max_new_tokens=1))  # holds the engine until release
        assert engine.started.wait(10)
        gone: Future = batcher.submit([[1]], SamplingParams(n=8, max_new_tokens=3))  # its client disconnects
        assert gone.cancel()
        small = batcher.submit([[2]], SamplingParams(max_new_tokens=2))
        engine.release.set()
        assert small.result(10)[0][0].response_ids == [0] and len(blocker.result(10)[0]) == 2
        assert batcher.alive() and engine.calls == ["1:2", "2:1"]  # none of the cancelled request's 4 chunks
    finally:
        engine.release.set()
        batcher.stop()


def test_a_small_request_completes_while_a_big_one_is_served(tiny):
    srv = RolloutServer(EmbeddedEngine(tiny, max_batch_size=2), ServerConfig(port=0)).start()
    big_chunks = []  # chunks of the big request run so far, counted by the engine itself
    run_chunk = srv.engine.generate_chunk
    srv.engine.generate_chunk = lambda prompts, params, chunk: (
        big_chunks.append(1) if params.n == 64 else None, run_chunk(prompts, params, chunk))[1]
    try:
        big_body = {"input_ids": [[5, 6, 7]], "sampling_params": {"n": 64, "max_new_tokens": 12, "ignore_eos": True}}
        box: dict = {}
        big = threading.Thread(target=lambda: box.setdefault("big", post(srv, "/generate", big_body)))
        big.start()
        while not big_chunks:  # the big request is on the engine
            time.sleep(0.001)
        small = post(srv, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        done_when_small_returned = len(big_chunks)
        assert small.status_code == 200 and len(small.json()["output_ids"]) <= 2
        big.join(120)
        assert box["big"].status_code == 200 and len(box["big"].json()) == 64
        assert all(len(item["output_ids"]) == 12 for item in box["big"].json())
        # 32 chunks of 2 rows; the small request waited for the one running and at most one more.
        assert len(big_chunks) == 32 and done_when_small_returned <= 3, done_when_small_returned
    finally:
        srv.stop()
