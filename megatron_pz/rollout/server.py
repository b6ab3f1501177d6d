"""HTTP server putting the embedded engine behind SGLang's native endpoints, with SGLang's JSON shapes.

Why mirror SGLang exactly: CI and laptops then exercise the very client (sglang_client.py) that talks to SGLang
in production. Shapes are taken from the pinned SGLang release (0.5.23):

* ``/generate`` request: ``GenerateReqInput`` (``sglang/srt/managers/io_struct.py``); sampling params
  ``SamplingParams`` (``sglang/srt/sampling/sampling_params.py``); unknown sampling keys are rejected like the
  JSON contract gate does (``sglang/api/v1/api_types.py``: "SamplingParams: unknown keys rejected").
* ``/generate`` response: one dict per sample (a list for batch input, prompt-major with ``n`` samples per prompt,
  as ``TokenizerManager._handle_batch_request`` orders them), each ``{"text", "output_ids", "meta_info"}``;
  ``meta_info`` as built in ``TokenizerManager._handle_batch_output`` (``sglang/srt/managers/tokenizer_manager.py``):
  ``id, finish_reason, prompt_tokens, weight_version (str), completion_tokens, cached_tokens, e2e_latency`` and,
  with ``return_logprob``, ``output_token_logprobs`` as ``[[logprob, token_id, text_or_null], ...]``
  (``detokenize_logprob_tokens``). ``finish_reason`` is ``{"type": "stop", "matched": id_or_str}``,
  ``{"type": "length", "length": n}`` or ``{"type": "abort", "message": ...}`` (``FINISH_*.to_json`` in
  ``sglang/srt/managers/schedule_batch.py``).
* control endpoints return what ``sglang/srt/entrypoints/http_server.py`` returns (``{"success", "message"}``...).
* auth: ``Authorization: Bearer <api key>`` on every endpoint except ``/health*``, ``/ready``, ``/metrics``
  (``decide_request_auth`` in ``sglang/srt/utils/auth.py``); 401 ``{"error": "Unauthorized"}`` otherwise.

Beyond SGLang, for safety: the server binds 127.0.0.1 unless told otherwise and refuses to start on another
address without an API key; ``/update_weights_from_disk`` only reads below ``--weights-dir`` (403 otherwise) and
requires a ``weight_version`` strictly above the current one.

Requests arriving within ``batch_window_s`` with equal sampling parameters are merged into one engine call.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megatron_pz.errors import RolloutError, UserError
from megatron_pz.rollout.embedded import EmbeddedEngine
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams
from megatron_pz.rollout.updater import PARTIAL_VERSION_SUFFIX

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024 * 1024  # a generate request with thousands of long prompts still fits
_UNAUTHENTICATED_PREFIXES = ("/health", "/ready", "/metrics")  # as sglang/srt/utils/auth.py
# SGLang sampling keys we honour, and those we accept only at their neutral value (anything else: 400).
_SUPPORTED_SAMPLING = {"max_new_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids",
                       "ignore_eos", "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens"}
_NEUTRAL_SAMPLING = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                     "min_new_tokens": 0, "no_stop_trim": False, "logit_bias": {}, "stop_regex": None,
                     "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
                     "stream_interval": None, "custom_params": None, "beam_width": None, "watermark": None}
_SGLANG_TOP_K_ALL = 1 << 30  # sglang SamplingParams TOP_K_ALL


class HTTPError(Exception):
    """An error answered to the client as ``{"error": {"message": ...}}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerConfig:
    """Network and safety settings of one embedded rollout server."""

    host: str = "127.0.0.1"
    """Bind address. Anything but loopback requires ``api_key``."""
    port: int = 30000
    """0 = pick a free port (see ``RolloutServer.port``)."""
    api_key: str | None = None
    """Required as ``Authorization: Bearer <key>`` when set (SGLang's ``--api-key``)."""
    weights_dir: str | None = None
    """``/update_weights_from_disk`` only reads folders below this one; None disables disk updates."""
    batch_window_s: float = 0.005
    """Merge requests into one engine call while they arrive less than this apart (at most 10 windows)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------------------
# Request parsing and response building (pure functions: unit-testable, and the wire test checks their output)
# --------------------------------------------------------------------------------------------------------------

def parse_sampling_params(raw: dict | None) -> SamplingParams:
    """SGLang's sampling_params dict -> SamplingParams; HTTPError(400) naming any unsupported key or value."""
    raw = dict(raw or {})
    for key, value in raw.items():
        if key in _SUPPORTED_SAMPLING:
            continue
        if key in _NEUTRAL_SAMPLING:
            if value is not None and value != _NEUTRAL_SAMPLING[key]:
                raise HTTPError(400, f"sampling_params.{key}={value!r} is not supported by the embedded engine")
            continue
        raise HTTPError(400, f"unknown sampling_params key {key!r}")
    stop = raw.get("stop") or ()
    top_k = raw.get("top_k")
    try:
        return SamplingParams(
            n=int(raw.get("n") or 1),
            max_new_tokens=int(raw.get("max_new_tokens") if raw.get("max_new_tokens") is not None else 128),
            temperature=float(raw.get("temperature") if raw.get("temperature") is not None else 1.0),
            top_p=float(raw.get("top_p") if raw.get("top_p") is not None else 1.0),
            top_k=-1 if top_k in (None, -1, _SGLANG_TOP_K_ALL) else int(top_k),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(raw.get("stop_token_ids") or ()),
            ignore_eos=bool(raw.get("ignore_eos", False)),
            seed=raw.get("sampling_seed"),
            skip_special_tokens=bool(raw.get("skip_special_tokens", True)),
        )
    except (TypeError, ValueError, UserError) as exc:
        raise HTTPError(400, f"invalid sampling_params: {exc}") from None


def finish_reason_json(result: GenerationResult) -> dict:
    """SGLang's FINISH_*.to_json() (sglang/srt/managers/schedule_batch.py)."""
    if result.finish_reason == "stop":
        return {"type": "stop", "matched": result.matched_stop}
    if result.finish_reason == "length":
        return {"type": "length", "length": len(result.response_ids)}
    return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


def generate_response_item(result: GenerationResult, prompt_len: int, return_logprob: bool,
                           token_text: Callable[[int], str] | None) -> dict:
    """One ``/generate`` output dict, shaped like SGLang's (see module docstring)."""
    version = str(result.weight_version)
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "finish_reason": finish_reason_json(result),
        "prompt_tokens": prompt_len,
        "weight_version": version,
        "completion_tokens": len(result.response_ids),
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "weight_versions": [{"version": version, "start": 0, "end": len(result.response_ids)}],
        "e2e_latency": float(result.extra.get("e2e_latency", 0.0)),
    }
    if return_logprob:
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [
            [float(lp), int(tok), token_text(tok) if token_text else None]
            for lp, tok in zip(result.logprobs, result.response_ids)
        ]
        meta["output_token_logprobs_length"] = len(result.response_ids)
    return {"text": result.text or "", "output_ids": list(result.response_ids), "meta_info": meta}


# --------------------------------------------------------------------------------------------------------------
# Batching requests into engine calls
# --------------------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    prompts: list[list[int]]
    params: SamplingParams
    future: Future


class _Batcher:
    """One thread feeding the engine: merges jobs with equal sampling params arriving within a short window."""

    def __init__(self, engine: EmbeddedEngine, window_s: float):
        self.engine = engine
        self.window_s = window_s
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rollout-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Future:
        job = _Job(prompts, params, Future())
        self._queue.put(job)
        return job.future

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            rows = len(first.prompts) * first.params.n
            # Keep collecting while requests keep arriving (a burst from the pool's threads), up to a cap:
            # stop after `window_s` without a new request, at max_batch_size rows, or after 10 windows.
            cap = time.monotonic() + 10 * self.window_s
            while rows < self.engine.max_batch_size:
                wait = min(self.window_s, cap - time.monotonic())
                if wait <= 0:
                    break
                try:
                    job = self._queue.get(timeout=wait)
                except queue.Empty:
                    break
                jobs.append(job)
                rows += len(job.prompts) * job.params.n
            groups: dict[SamplingParams, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.params, []).append(job)
            for params, group in groups.items():
                self._run(params, group)

    def _run(self, params: SamplingParams, group: list[_Job]) -> None:
        prompts = [p for job in group for p in job.prompts]
        try:
            results = self.engine.generate(prompts, params)
        except Exception as exc:  # answered to every waiting request; the batcher keeps serving
            logger.exception("engine.generate failed for %d prompts", len(prompts))
            for job in group:
                job.future.set_exception(exc)
            return
        start = 0
        for job in group:
            job.future.set_result(results[start:start + len(job.prompts)])
            start += len(job.prompts)


# --------------------------------------------------------------------------------------------------------------
# The HTTP server
# --------------------------------------------------------------------------------------------------------------

class RolloutServer:
    """The embedded engine behind SGLang-compatible HTTP endpoints. ``start()`` serves on a background thread."""

    def __init__(self, engine: EmbeddedEngine, config: ServerConfig):
        if not is_loopback(config.host) and not config.api_key:
            raise UserError(f"refusing to serve on non-loopback address {config.host!r} without an API key: "
                            "pass --api-key (or set MEGATRON_PZ_ROLLOUT_API_KEY), or bind 127.0.0.1")
        self.engine = engine
        self.config = config
        self.weights_dir = os.path.realpath(config.weights_dir) if config.weights_dir else None
        self.batcher = _Batcher(engine, config.batch_window_s)
        self.httpd = _HTTPServer((config.host, config.port), _make_handler(self))
        self._thread: threading.Thread | None = None
        self._routes: dict[tuple[str, str], Callable[[dict], tuple[int, Any]]] = {}
        for methods, path, fn in [
            (("GET",), "/health", self._health), (("GET",), "/health_generate", self._health),
            (("GET",), "/ready", self._health),
            (("POST", "PUT"), "/generate", self._generate),
            (("GET", "POST"), "/flush_cache", self._flush_cache),
            (("GET",), "/get_model_info", self._model_info), (("GET",), "/model_info", self._model_info),
            (("GET",), "/get_server_info", self._server_info), (("GET",), "/server_info", self._server_info),
            (("POST",), "/update_weights_from_disk", self._update_from_disk),
            (("POST",), "/update_weights_from_tensor", self._update_from_tensor),
            (("POST",), "/init_weights_update_group", self._init_group),
            (("POST",), "/update_weights_from_distributed", self._update_from_distributed),
            (("POST",), "/destroy_weights_update_group", self._destroy_group),
            (("GET", "POST"), "/get_weights_by_name", self._get_weights_by_name),
            (("POST",), "/pause_generation", self._pause), (("POST",), "/continue_generation", self._continue),
            (("GET", "POST"), "/release_memory_occupation", self._release_memory),
            (("GET", "POST"), "/resume_memory_occupation", self._resume_memory),
        ]:
            for method in methods:
                self._routes[(method, path)] = fn

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self) -> RolloutServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="rollout-http", daemon=True)
        self._thread.start()
        logger.info("rollout server listening on %s (auth %s, weights dir %s)", self.url,
                    "on" if self.config.api_key else "off", self.weights_dir)
        return self

    def serve_forever(self) -> None:
        logger.info("rollout server listening on %s (auth %s, weights dir %s)", self.url,
                    "on" if self.config.api_key else "off", self.weights_dir)
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.engine.continue_generation()  # release any request waiting on a pause
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.stop()

    # ---------------------------------------------------------------- dispatch (called by the handler)

    def authorized(self, path: str, header: str | None) -> bool:
        if not self.config.api_key or path.startswith(_UNAUTHENTICATED_PREFIXES):
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), self.config.api_key.encode())

    def route(self, method: str, path: str) -> Callable[[dict], tuple[int, Any]] | None:
        return self._routes.get((method, path))

    def known_path(self, path: str) -> bool:
        return any(p == path for _, p in self._routes)

    # ---------------------------------------------------------------- endpoints

    def _health(self, body: dict) -> tuple[int, Any]:
        ok = self.engine.health() and self.batcher.alive()
        return (200 if ok else 503), b""

    def _generate(self, body: dict) -> tuple[int, Any]:
        if body.get("stream"):
            raise HTTPError(400, "stream=true is not supported by the embedded engine")
        prompts, single = self._prompts(body)
        raw_params = body.get("sampling_params")
        per_prompt = raw_params if isinstance(raw_params, list) else [raw_params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise HTTPError(400, f"{len(per_prompt)} sampling_params for {len(prompts)} prompts")
        params = [parse_sampling_params(p) for p in per_prompt]
        if single and params[0].n > 1:
            single = False  # SGLang turns a single prompt with n > 1 into a batch (io_struct._handle_parallel_sampling)
        return_logprob = body.get("return_logprob")
        return_logprob = any(return_logprob) if isinstance(return_logprob, list) else bool(return_logprob)
        token_text = None
        if body.get("return_text_in_logprobs") and self.engine.tokenizer is not None:
            token_text = lambda tok: self.engine.tokenizer.decode([tok])
        # Reject bad prompts here, per request: once merged by the batcher, one bad prompt would fail everyone's.
        try:
            for i, p in enumerate(params):
                self.engine.check_prompts([prompts[i]], p)
        except UserError as exc:
            raise HTTPError(400, str(exc)) from None
        # Equal params -> one job (merged further by the batcher); otherwise one job per prompt.
        if all(p == params[0] for p in params):
            futures = [(self.batcher.submit(prompts, params[0]), list(range(len(prompts))))]
        else:
            futures = [(self.batcher.submit([prompts[i]], params[i]), [i]) for i in range(len(prompts))]
        items: list[dict | None] = [None] * sum(p.n for p in params)
        offsets = [sum(p.n for p in params[:i]) for i in range(len(params))]
        for future, indices in futures:
            try:
                groups = future.result()
            except UserError as exc:
                raise HTTPError(400, str(exc)) from None
            for i, group in zip(indices, groups):
                for j, res in enumerate(group):
                    items[offsets[i] + j] = generate_response_item(res, len(prompts[i]), return_logprob, token_text)
        return 200, items[0] if single else items

    def _prompts(self, body: dict) -> tuple[list[list[int]], bool]:
        ids, text = body.get("input_ids"), body.get("text")
        if ids is not None:
            if isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                return [ids], True
            if isinstance(ids, list) and ids and all(
                    isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                    for p in ids):
                return ids, False
            raise HTTPError(400, "input_ids must be a non-empty list of ints or a list of such lists")
        if text is not None:
            if self.engine.tokenizer is None:
                raise HTTPError(400, "text input needs a tokenizer; send input_ids")
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise HTTPError(400, "text must be a string or a list of strings")
            return [self.engine.tokenizer.encode(t) for t in texts], isinstance(text, str)
        raise HTTPError(400, "one of input_ids or text is required")

    def _flush_cache(self, body: dict) -> tuple[int, Any]:
        self.engine.flush_cache()
        return 200, "Cache flushed.\n"

    def _model_info(self, body: dict) -> tuple[int, Any]:
        return 200, {"model_path": self.engine.model_path, "tokenizer_path": self.engine.model_path,
                     "is_generation": True, "weight_version": str(self.engine.weight_version())}

    def _server_info(self, body: dict) -> tuple[int, Any]:
        return 200, {"engine": "megatron_pz.embedded", "model_path": self.engine.model_path,
                     "weight_version": str(self.engine.weight_version()),
                     "max_batch_size": self.engine.max_batch_size, "device": str(self.engine.device)}

    def _version_of(self, body: dict) -> int:
        raw = body.get("weight_version")
        if isinstance(raw, str) and raw.endswith(PARTIAL_VERSION_SUFFIX):
            raw = raw[: -len(PARTIAL_VERSION_SUFFIX)]  # a bucket of a multi-bucket update (we stage until complete)
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise HTTPError(400, f"weight_version must be an integer string (versions strictly increase), "
                                 f"got {raw!r}") from None

    def _update_from_disk(self, body: dict) -> tuple[int, Any]:
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise HTTPError(400, "model_path (string) is required")
        if self.weights_dir is None:
            raise HTTPError(403, "disk weight updates are disabled: this server was started without --weights-dir")
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.weights_dir]) != self.weights_dir:
            raise HTTPError(403, f"model_path {path!r} resolves to {real!r}, outside --weights-dir "
                                 f"{self.weights_dir!r}")
        version = self._version_of(body)
        try:
            self.engine.update_weights_from_disk(real, version)
        except (UserError, RolloutError) as exc:
            return 400, {"success": False, "message": str(exc), "num_paused_requests": 0}
        return 200, {"success": True, "message": f"Succeeded to update model weights. Weight version updated to "
                                                  f"{version}.", "num_paused_requests": 0}

    def _update_from_tensor(self, body: dict) -> tuple[int, Any]:
        try:
            self.engine.update_weights_from_tensor(body.get("serialized_named_tensors") or [], -1)
        except RolloutError as exc:
            return 400, {"success": False, "message": str(exc)}
        return 200, {"success": True, "message": "Success"}

    def _init_group(self, body: dict) -> tuple[int, Any]:
        try:
            self.engine.init_weights_update_group(
                str(body["master_address"]), int(body["master_port"]), int(body["rank_offset"]),
                int(body["world_size"]), str(body.get("group_name", "weight_update_group")),
                str(body.get("backend", "nccl")))
        except KeyError as exc:
            raise HTTPError(400, f"missing field {exc}") from None
        except (RolloutError, UserError, RuntimeError, ValueError) as exc:
            return 400, {"success": False, "message": f"Failed to initialize custom process group: {exc}."}
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def _update_from_distributed(self, body: dict) -> tuple[int, Any]:
        if body.get("load_format") not in (None,):
            raise HTTPError(400, f"load_format {body.get('load_format')!r} is not supported by the embedded engine")
        try:
            self.engine.update_weights_from_distributed(
                list(body["names"]), list(body["dtypes"]), [list(s) for s in body["shapes"]],
                self._version_of(body), str(body.get("group_name", "weight_update_group")))
        except KeyError as exc:
            raise HTTPError(400, f"missing field {exc}") from None
        except (RolloutError, UserError, RuntimeError) as exc:
            return 400, {"success": False, "message": str(exc)}
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def _destroy_group(self, body: dict) -> tuple[int, Any]:
        try:
            self.engine.destroy_weights_update_group(str(body.get("group_name", "weight_update_group")))
        except RolloutError as exc:
            return 400, {"success": False, "message": str(exc)}
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    def _get_weights_by_name(self, body: dict) -> tuple[int, Any]:
        try:
            return 200, self.engine.get_weights_by_name(str(body["name"]), int(body.get("truncate_size", 100)))
        except KeyError:
            raise HTTPError(400, "name is required") from None
        except RolloutError as exc:
            raise HTTPError(400, str(exc)) from None

    def _pause(self, body: dict) -> tuple[int, Any]:
        try:
            self.engine.pause_generation(str(body.get("mode", "abort")))
        except UserError as exc:
            raise HTTPError(400, str(exc)) from None
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def _continue(self, body: dict) -> tuple[int, Any]:
        self.engine.continue_generation()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def _release_memory(self, body: dict) -> tuple[int, Any]:
        self.engine.release_memory_occupation(body.get("tags"))
        return 200, None  # SGLang's handler returns nothing: FastAPI answers `null`

    def _resume_memory(self, body: dict) -> tuple[int, Any]:
        self.engine.resume_memory_occupation(body.get("tags"))
        return 200, None


class _HTTPServer(ThreadingHTTPServer):
    # The stdlib's listen backlog of 5 drops SYNs when a pool opens dozens of connections at once, and each
    # dropped SYN costs the client a 1 s retransmit.
    request_queue_size = 1024
    daemon_threads = True


def _make_handler(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for the client's requests.Session
        # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed ACK
        # (~40 ms per request on a keep-alive connection).
        disable_nagle_algorithm = True
        server_version = "megatron-pz-rollout"

        def log_message(self, fmt: str, *args) -> None:  # route the stdlib's access log to logging
            logger.debug("%s " + fmt, self.address_string(), *args)

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            try:
                body = self._read_json()  # always drain the body, or keep-alive desynchronises
                if not server.authorized(path, self.headers.get("Authorization")):
                    self._send(401, {"error": "Unauthorized"})
                    return
                fn = server.route(method, path)
                if fn is None:
                    status = 405 if server.known_path(path) else 404
                    raise HTTPError(status, f"{method} {path} is not served by the embedded rollout server")
                status, payload = fn(body)
                self._send(status, payload)
            except HTTPError as exc:
                self._send(exc.status, {"error": {"message": str(exc)}})
            except (BrokenPipeError, ConnectionResetError):
                logger.debug("client went away during %s %s", method, path)
            except Exception as exc:  # a bug: answer 500 and keep serving
                logger.exception("%s %s failed", method, path)
                self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})

        def _read_json(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                raise HTTPError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            raw = self.rfile.read(length) if length else b""
            if not raw.strip():
                return {}
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise HTTPError(400, f"invalid JSON body: {exc}") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "the JSON body must be an object")
            return body

        def _send(self, status: int, payload: Any) -> None:
            if isinstance(payload, bytes):
                data, ctype = payload, "text/plain"
            elif isinstance(payload, str):
                data, ctype = payload.encode(), "text/plain; charset=utf-8"
            else:
                data, ctype = json.dumps(payload).encode(), "application/json"
            try:
                self.send_response(status, HTTPStatus(status).phrase)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                logger.debug("client went away before the %d response", status)

    return Handler
