"""The embedded engine behind SGLang's native HTTP endpoints, served like SGLang serves them: FastAPI on uvicorn.

What this module owns is the HTTP plumbing; the endpoints are ``endpoints.py`` (SGLang's native ones) and
``openai.py`` (its OpenAI-compatible ones), the request models and response shapes ``wire.py`` and
``wire_openai.py``, the request merging ``batcher.py``.

* auth: ``Authorization: Bearer <api key>`` on every endpoint except ``/health*``, ``/ready``, ``/metrics``
  (``decide_request_auth`` in ``sglang/srt/utils/auth.py``); 401 ``{"error": "Unauthorized"}`` otherwise. The key
  is checked by an ASGI middleware before routing and before a byte of the body is read, so an unauthenticated
  client cannot make the server read or parse a large body; so is the body-size cap (413). A body that has not
  fully arrived ``body_timeout_s`` after the request began answers 408 (a Content-Length larger than the body).
* bodies are parsed as strict JSON (``strict_json.py``: no NaN/Infinity, duplicate keys, deep nesting or invalid
  UTF-8), and ``/generate`` checks the request limits (``limits.py``) before tokenising or generating; the limits
  and every error are tabled in docs/rollout.md ("Server limits and errors").
* errors: every error answers ``{"error": {"message": ...}}``: FastAPI's 422 validation errors become 400 with a
  message naming the bad field, unknown paths 404, a known path with another method 405, a bug 500 (logged).
* the server binds 127.0.0.1 unless told otherwise and refuses to start on another address without an API key.
* every body is read as JSON whatever its Content-Type says, as the embedded server always has.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass

from megatron_pz.engine import strict_json
from megatron_pz.engine.batcher import Batcher
from megatron_pz.engine.endpoints import Endpoints
from megatron_pz.engine.limits import (
    BODY_TIMEOUT_S,
    DEFAULT_MAX_N,
    DEFAULT_MAX_PROMPT_CHARS,
    FALLBACK_MAX_PROMPT_TOKENS,
    MAX_BODY_BYTES,
    RequestLimits,
)
from megatron_pz.engine.replies import error_reply, reply
from megatron_pz.engine.wire import HTTPError
from megatron_pz.errors import RolloutError, UserError

logger = logging.getLogger(__name__)

UNAUTHENTICATED_PREFIXES = ("/health", "/ready", "/metrics")  # as sglang/srt/utils/auth.py
# In-flight requests get this long to finish after a shutdown request; the launcher's grace period is longer.
SHUTDOWN_GRACE_S = 5
# A client's keep-alive connection stays open this long between requests (the pool reuses its connections).
KEEP_ALIVE_S = 3600


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
    max_body_bytes: int = MAX_BODY_BYTES
    """Larger bodies answer 413 before they are read (by Content-Length) or as soon as they pass it (chunked)."""
    body_timeout_s: float = BODY_TIMEOUT_S
    """A body still incomplete this long after the request started answers 408."""
    max_n: int = DEFAULT_MAX_N
    """Largest ``sampling_params.n`` one /generate request may ask for (400 above)."""
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    """Longest text prompt, in characters, checked before it is tokenised (400 above)."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens (400 above); None = the model's max_position_embeddings (131072 if unknown)."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_n", "max_prompt_chars", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"serve-rollout --{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("batch_window_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"ServerConfig.{name} must be > 0, got {getattr(self, name)!r}")

    def limits(self, model_max_positions: int | None) -> RequestLimits:
        tokens = self.max_prompt_tokens or model_max_positions or FALLBACK_MAX_PROMPT_TOKENS
        return RequestLimits(max_n=self.max_n, max_prompt_chars=self.max_prompt_chars, max_prompt_tokens=tokens)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorized(api_key: str | None, path: str, header: str | None) -> bool:
    """SGLang's rule: no key, or a probe path, or ``Bearer <key>`` (compared in constant time)."""
    if not api_key or path.startswith(UNAUTHENTICATED_PREFIXES):
        return True
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), api_key.encode())


class RequestGate:
    """ASGI middleware run before routing and before the body is read: API key, body size, JSON content type,
    and a deadline for the body to arrive."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES,
                 body_timeout_s: float = BODY_TIMEOUT_S):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if not authorized(self.api_key, scope["path"], headers.get("authorization")):
            await reply(401, {"error": "Unauthorized"})(scope, receive, send)
            return
        # The HTTP parser (h11) already answers 400 to a non-numeric, negative or repeated Content-Length.
        length = int(headers.get("content-length") or 0)
        if length > self.max_body_bytes:
            response = error_reply(413, f"request body of {length} bytes exceeds {self.max_body_bytes} "
                                        "(serve-rollout --max-body-bytes)")
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")])
        await self.app(scope, self._capped(receive, length), send)

    def _capped(self, receive, length: int):
        """``receive`` that refuses a body growing past the cap (chunked: no Content-Length) and one that stops
        arriving: a Content-Length larger than what the client sends would otherwise hold the request open."""
        import asyncio

        from starlette.exceptions import HTTPException

        seen = 0
        done = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s  # for the whole body, not per chunk

        async def capped():
            nonlocal seen, done
            if done:  # after the body: a wait for the disconnect, which has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                announced = f" of the {length} announced by Content-Length" if length else ""
                raise HTTPException(408, f"request body incomplete: {seen} bytes{announced} arrived in "
                                         f"{self.body_timeout_s:g} s (serve-rollout --body-timeout-s)") from None
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise HTTPException(413, f"request body exceeds {self.max_body_bytes} bytes "
                                         "(serve-rollout --max-body-bytes)")
            done = message.get("type") != "http.request" or not message.get("more_body", False)
            return message

        return capped


def build_app(endpoints: Endpoints, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES,
              body_timeout_s: float = BODY_TIMEOUT_S):
    """The FastAPI app: ``endpoints``' routes, SGLang-shaped errors, the request gate in front."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.routing import APIRoute
    from starlette.exceptions import HTTPException

    class StrictJSONRequest(Request):
        """A request whose JSON body is parsed by ``strict_json`` (no NaN, duplicate keys, deep nesting...)."""

        async def json(self):
            if not hasattr(self, "_json"):
                try:
                    self._json = strict_json.loads(await self.body())
                except strict_json.BadJSON as exc:
                    raise HTTPException(400, str(exc)) from None
            return self._json

    class GuardedRoute(APIRoute):
        """A route whose unexpected exceptions answer 500 with the error (and are logged), like the old server."""

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def guarded(request: Request):
                try:
                    return await handler(StrictJSONRequest(request.scope, request.receive, request._send))
                except (HTTPError, HTTPException, RequestValidationError):
                    raise
                except Exception as exc:  # a bug: answer 500 and keep serving
                    logger.exception("%s %s failed", request.method, request.url.path)
                    return error_reply(500, f"{type(exc).__name__}: {exc}")

            return guarded

    app = FastAPI(title="megatron-pz embedded rollout server", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = GuardedRoute
    for route in endpoints.routes():
        app.add_api_route(route.path, route.handler, methods=list(route.methods))

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError):
        return error_reply(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def starlette_error(request: Request, exc: HTTPException):
        if exc.status_code in (404, 405):
            return error_reply(exc.status_code, f"{request.method} {request.url.path} is not served by the "
                                                "embedded rollout server")
        response = error_reply(exc.status_code, str(exc.detail))
        if exc.status_code in (408, 413):  # the rest of the body was never read: this connection cannot go on
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_reply(400, validation_message(exc.errors()))

    app.add_middleware(RequestGate, api_key=api_key, max_body_bytes=max_body_bytes,
                       body_timeout_s=body_timeout_s)
    return app


def validation_message(errors) -> str:
    """FastAPI's 422 error list as one line naming each bad field (what the old server answered with 400)."""
    by_field: dict[str, list[str]] = {}
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_union_tag(x)]
        if err.get("type") == "json_invalid":
            return f"invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))} (at character {loc[0]})" \
                if loc else "invalid JSON body"
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            return "the JSON body must be an object"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        by_field.setdefault(".".join(loc) or "body", []).append(msg)
    parts = [msgs[0] if len(msgs) == 1 and msgs[0].startswith(field) else f"{field}: {' or '.join(dict.fromkeys(msgs))}"
             for field, msgs in by_field.items()]
    return "invalid request: " + "; ".join(parts)


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union in an error's location ("list[int]", "str", "function-plain[...]")."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none", "list", "dict"))


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. Bound now, so the port is known at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    # A pool opens dozens of connections at once; a short backlog drops SYNs (a 1 s client retransmit each).
    sock.listen(1024)
    return sock


class RolloutServer:
    """The embedded engine behind SGLang-compatible HTTP endpoints. ``start()`` serves on a background thread."""

    def __init__(self, engine, config: ServerConfig):
        """``engine``: an ``EmbeddedEngine``. Binds the port now (``port``/``url`` are valid before ``start``)."""
        if not is_loopback(config.host) and not config.api_key:
            raise UserError(f"refusing to serve on non-loopback address {config.host!r} without an API key: "
                            "pass --api-key (or set MEGATRON_PZ_ROLLOUT_API_KEY), or bind 127.0.0.1")
        import uvicorn

        self.engine = engine
        self.config = config
        self.weights_dir = os.path.realpath(config.weights_dir) if config.weights_dir else None
        self.batcher = Batcher(engine, config.batch_window_s)
        self.endpoints = Endpoints(engine, self.batcher, self.weights_dir,
                                   config.limits(getattr(engine, "max_positions", None)))
        self.app = build_app(self.endpoints, config.api_key, config.max_body_bytes, config.body_timeout_s)
        self._sock = bind_socket(config.host, config.port)
        # uvicorn's own lines (start-up banner, access log) stay quiet: the server logs what matters itself.
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, lifespan="off", log_config=None, log_level="warning", access_log=False, backlog=1024,
            timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def routes(self) -> set[tuple[str, str]]:
        """The (method, path) pairs served."""
        return {(m, r.path) for r in self.endpoints.routes() for m in r.methods}

    def start(self, timeout_s: float = 60.0) -> RolloutServer:
        """Serve on a background thread; returns once uvicorn accepts connections."""
        # uvicorn off the main thread installs no signal handlers: the caller owns SIGTERM/SIGINT (serve.py).
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._sock]},
                                        name="rollout-http", daemon=True)
        self._thread.start()
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RolloutError(f"rollout server on {self.url} failed to start (see the log above)")
            self._thread.join(timeout=0.01)
            timeout_s -= 0.01
            if timeout_s <= 0:
                raise RolloutError(f"rollout server on {self.url} did not start")
        logger.info("rollout server listening on %s (auth %s, weights dir %s)", self.url,
                    "on" if self.config.api_key else "off", self.weights_dir)
        return self

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (e.g. from a signal handler), then release the port and the batcher."""
        self.start()
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)  # wakes for signal handlers
        finally:
            self.close()

    def shutdown(self) -> None:
        """Ask the server to stop (safe from a signal handler): no new connections, in-flight ones finish."""
        self._uvicorn.should_exit = True

    def stop(self) -> None:
        self.engine.continue_generation()  # release any request waiting on a pause
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=SHUTDOWN_GRACE_S + 5)
        self.close()

    def close(self) -> None:
        """Release the port and stop the batcher (also for a server that was never started)."""
        self._sock.close()
        self.batcher.stop()
