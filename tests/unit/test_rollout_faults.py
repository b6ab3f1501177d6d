"""Client and pool under faults, against small scripted HTTP servers on 127.0.0.1 (no model involved).

Each fake server answers request k with the k-th scripted action: "ok", "500", "400", "garbage" (200 + HTML),
"bad_shape" (200 + JSON of the wrong size), "close" (accept, read, then drop the connection: a server killed
mid-request), "hang" (answer after longer than the client's read timeout). Every loop is bounded: the tests also
assert elapsed time.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_pz.errors import RolloutError
from megatron_pz.rollout.pool import PoolConfig, RolloutPool
from megatron_pz.rollout.protocol import SamplingParams
from megatron_pz.rollout.http_transport import BadResponse, ServerUnavailable
from megatron_pz.rollout.sglang_client import ClientConfig, SGLangClient

NUM_GPUS = 0
PARAMS = SamplingParams(n=2, max_new_tokens=2)


def fast(**kw) -> ClientConfig:
    base = {"max_retries": 2, "backoff_s": 0.01, "backoff_max_s": 0.05, "connect_timeout_s": 1.0,
            "generate_timeout_s": 5.0, "control_timeout_s": 5.0, "max_total_s": 10.0}
    return ClientConfig(**{**base, **kw})


class FakeSGLang:
    """A scripted stand-in for one SGLang server."""

    def __init__(self, actions=(), default="ok", hang_s=1.0):
        self.actions = list(actions)
        self.default = default
        self.hang_s = hang_s
        self.requests: list[str] = []
        self.version = "0"
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/get_model_info":
                    self._send(200, json.dumps({"weight_version": fake.version}).encode())
                else:
                    self._send(200, b"")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with fake.lock:
                    fake.requests.append(self.path)
                    action = fake.actions.pop(0) if fake.actions else fake.default
                if action == "close":
                    if self.path == "/update_weights_from_disk":
                        fake.version = body["weight_version"]  # the update landed, the answer was lost
                    self.close_connection = True
                    return
                if action == "hang":
                    time.sleep(fake.hang_s)
                    action = "ok"
                if action == "500":
                    self._send(500, b"Internal Server Error")
                elif action == "400":
                    self._send(400, json.dumps({"error": {"message": "bad request: nope"}}).encode())
                elif action == "garbage":
                    self._send(200, b"<html>502 Bad Gateway</html>", "text/html")
                elif action == "bad_shape":
                    self._send(200, json.dumps([]).encode())
                elif self.path == "/generate":
                    self._send(200, json.dumps(fake.generate_items(body)).encode())
                elif action == "fail":
                    self._send(400, json.dumps({"success": False, "message": "load failed"}).encode())
                else:
                    if self.path == "/update_weights_from_disk":
                        fake.version = body["weight_version"]
                    self._send(200, json.dumps({"success": True, "message": "ok"}).encode())

            def _send(self, status, data, ctype="application/json"):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first ("hang"): expected

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def generate_items(self, body):
        n = body["sampling_params"]["n"]
        return [{"text": "ab", "output_ids": [7, 8], "meta_info": {
            "id": "x", "finish_reason": {"type": "length", "length": 2}, "weight_version": self.version,
            "output_token_logprobs": [[-0.1, 7, None], [-0.2, 8, None]]}}
            for _ in body["input_ids"] for _ in range(n)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fakes():
    made: list[FakeSGLang] = []

    def make(*args, **kw):
        made.append(FakeSGLang(*args, **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def test_5xx_then_success_is_retried(fakes):
    srv = fakes(["500", "500", "ok"])
    out = SGLangClient(srv.url, fast()).generate([[1, 2]], PARAMS)
    assert len(srv.requests) == 3 and [r.response_ids for r in out[0]] == [[7, 8], [7, 8]]


def test_5xx_forever_gives_a_clear_error_in_bounded_time(fakes):
    srv = fakes(default="500")
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=rf"POST {srv.url}/generate: unreachable after 3 attempt"):
        SGLangClient(srv.url, fast()).generate([[1, 2]], PARAMS)
    assert len(srv.requests) == 3 and time.monotonic() - t0 < 5


@pytest.mark.parametrize("action,match", [("garbage", "not JSON"), ("bad_shape", "expected a list of 2 outputs"),
                                          ("400", "HTTP 400: bad request: nope")])
def test_garbage_and_4xx_are_clear_errors_and_not_retried(fakes, action, match):
    srv = fakes(default=action)
    with pytest.raises(BadResponse, match=match) as info:
        SGLangClient(srv.url, fast()).generate([[1, 2]], PARAMS)
    assert srv.url in str(info.value) and "/generate" in str(info.value)
    assert len(srv.requests) == 1


def test_connection_dropped_mid_request_is_retried(fakes):
    srv = fakes(["close", "ok"])
    out = SGLangClient(srv.url, fast()).generate([[1]], PARAMS)
    assert len(srv.requests) == 2 and len(out[0]) == 2


def test_timeout_is_retried_then_a_clear_error(fakes):
    srv = fakes(["hang", "ok"], hang_s=1.0)
    assert SGLangClient(srv.url, fast(generate_timeout_s=0.3)).generate([[1]], PARAMS)
    srv = fakes(default="hang", hang_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match="ReadTimeout"):
        SGLangClient(srv.url, fast(generate_timeout_s=0.3, max_retries=1)).generate([[1]], PARAMS)
    assert len(srv.requests) == 2 and time.monotonic() - t0 < 3


def test_unreachable_server_is_a_clear_error():
    url = dead_url()
    with pytest.raises(ServerUnavailable, match=rf"{url}/generate: unreachable after 2 attempt.*ConnectionError"):
        SGLangClient(url, fast(max_retries=1)).generate([[1]], PARAMS)


def test_lost_answer_of_a_weight_update_is_not_applied_twice(fakes):
    srv = fakes(["close"])  # applies the update, then drops the connection
    SGLangClient(srv.url, fast()).update_weights_from_disk("/w/v00000001", 1)
    assert srv.requests.count("/update_weights_from_disk") == 1 and srv.version == "1"


def test_pool_routes_around_a_dead_endpoint(fakes):
    live = fakes()
    pool = RolloutPool([dead_url(), live.url], PoolConfig(dead_cooldown_s=60), client_config=fast(max_retries=0))
    out = pool.generate([[i] for i in range(6)], PARAMS)
    assert [g[0].prompt_index for g in out] == list(range(6))
    assert {r.server for g in out for r in g} == {live.url}
    assert pool.servers[0].dead_until > time.monotonic() and "unreachable" in pool.servers[0].last_error
    pool.close()


def test_pool_redispatches_when_a_server_dies_mid_batch(fakes):
    dying, live = fakes(default="close"), fakes()
    pool = RolloutPool([dying.url, live.url], client_config=fast(max_retries=0))
    out = pool.generate([[i] for i in range(8)], PARAMS)
    assert all(r.server == live.url for g in out for r in g) and len(dying.requests) >= 1
    pool.close()


def test_pool_with_every_server_down_fails_clearly_and_quickly():
    urls = [dead_url(), dead_url()]
    pool = RolloutPool(urls, client_config=fast(max_retries=0))
    t0 = time.monotonic()
    with pytest.raises(RolloutError) as info:
        pool.generate([[1], [2]], PARAMS)
    assert all(u in str(info.value) for u in urls) and time.monotonic() - t0 < 5
    pool.close()


def test_pool_respects_the_per_server_concurrency_limit(fakes):
    srv = fakes(default="hang", hang_s=0.2)
    pool = RolloutPool([srv.url], PoolConfig(max_concurrency_per_server=2), client_config=fast())
    in_flight, peak = [0], [0]
    lock = threading.Lock()
    real_generate = pool.servers[0].client.generate

    def counting(prompts, params):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            return real_generate(prompts, params)
        finally:
            with lock:
                in_flight[0] -= 1

    pool.servers[0].client.generate = counting
    pool.generate([[i] for i in range(6)], PARAMS)
    assert peak[0] == 2 and len(srv.requests) == 6
    pool.close()


def test_a_server_that_misses_an_update_stops_serving(fakes):
    ok, failing = fakes(), fakes(default="fail")
    pool = RolloutPool([ok.url, failing.url], client_config=fast())
    pool.update_weights_from_disk("/w/v00000001", 1)  # one server failed: logged, and it is excluded
    out = pool.generate([[i] for i in range(4)], PARAMS)
    assert {r.server for g in out for r in g} == {ok.url} and pool.weight_version() == 1
    with pytest.raises(RolloutError, match="failed on every server"):
        RolloutPool([failing.url], client_config=fast()).update_weights_from_disk("/w/v00000002", 2)
    pool.close()


def test_flush_cache_waits_for_running_requests_to_drain(fakes):
    srv = fakes(["400", "ok"])  # SGLang: 400 while requests are still running
    SGLangClient(srv.url, fast()).flush_cache()
    assert srv.requests == ["/flush_cache", "/flush_cache"]
    stuck = fakes(default="400")
    with pytest.raises(BadResponse, match="HTTP 400"):
        SGLangClient(stuck.url, fast()).flush_cache(timeout_s=0.6)
