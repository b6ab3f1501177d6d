"""HTTP transport to ONE server: keep-alive session, timeouts, retries with backoff, errors mapped to two kinds.

Failure policy:
  * connection refused/reset, a server closing the connection mid-request, timeouts, HTTP 429/5xx: retried with
    exponential backoff and jitter, bounded in attempts and total time, then ``ServerUnavailable``;
  * other HTTP 4xx, or a 2xx body that is not JSON: ``BadResponse`` at once (retrying cannot help).
Both are ``RolloutError`` and name the server URL and endpoint. What the endpoints mean is sglang_client.py's job.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import requests

from megatron_pz.errors import RolloutError

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class ServerUnavailable(RolloutError):
    """The server could not be reached, timed out or answered 5xx, after retries. Another server may work."""


class BadResponse(RolloutError):
    """The server answered 4xx or something that is not the expected JSON. Not retried."""


@dataclass
class ClientConfig:
    """Timeouts and retry policy of one server connection."""

    api_key: str | None = None
    """Sent as ``Authorization: Bearer <key>`` (SGLang's ``--api-key``)."""
    connect_timeout_s: float = 5.0
    generate_timeout_s: float = 900.0
    """Read timeout of one /generate call: long rollouts are slow."""
    control_timeout_s: float = 900.0
    """Read timeout of weight updates and other control calls (a disk update reads the whole model)."""
    max_retries: int = 3
    """Retries after the first attempt, for retryable failures only."""
    backoff_s: float = 0.5
    """First backoff; doubles per retry, with jitter in [50%, 100%]."""
    backoff_max_s: float = 8.0
    max_total_s: float = 1800.0
    """No new attempt starts after this many seconds since the first one."""
    return_routed_experts: bool = False
    """Ask /generate for the experts each token was routed to (MoE routing replay)."""

    def backoff(self, attempt: int) -> float:
        """Delay before retry ``attempt`` (1-based), without jitter."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))


class HttpTransport:
    """JSON over HTTP to one base URL. Thread-safe for concurrent requests (requests.Session keeps a keep-alive
    pool)."""

    def __init__(self, base_url: str, config: ClientConfig | None = None, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.config = config or ClientConfig()
        self.session = session or requests.Session()
        # A pool big enough for the pool's per-server concurrency: requests' default of 10 would serialise.
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=256, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if self.config.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.config.api_key}"

    def request(self, method: str, endpoint: str, payload: dict | None = None, *, timeout_s: float,
                retries: int | None = None, expect_json: bool = True) -> Any:
        """One call with the retry policy of the module docstring; returns parsed JSON (or text)."""
        url = self.base_url + endpoint
        retries = self.config.max_retries if retries is None else retries
        start = time.monotonic()
        last: Exception | None = None
        for attempt in range(retries + 1):
            if attempt:
                delay = self.config.backoff(attempt)
                delay *= random.uniform(0.5, 1.0)  # jitter: servers restarted together are not hit in lockstep
                if time.monotonic() - start + delay > self.config.max_total_s:
                    break
                logger.warning("%s %s: %s; retry %d/%d in %.2fs", method, url, last, attempt, retries, delay)
                time.sleep(delay)
            try:
                resp = self.session.request(method, url, json=payload,
                                            timeout=(self.config.connect_timeout_s, timeout_s))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                # Refused connection, a server dying mid-request (RemoteDisconnected) or mid-body, a timeout.
                last = exc
                continue
            if resp.status_code in RETRY_STATUS:
                last = ServerUnavailable(f"HTTP {resp.status_code}: {resp.text[:200]!r}")
                continue
            if resp.status_code >= 400:
                raise BadResponse(f"{method} {url} -> HTTP {resp.status_code}: {error_text(resp)}")
            if not expect_json:
                return resp.text
            try:
                return resp.json()
            except ValueError:
                raise BadResponse(f"{method} {url} -> HTTP {resp.status_code} with a body that is not JSON: "
                                  f"{resp.text[:200]!r}") from None
        raise ServerUnavailable(f"{method} {url}: unreachable after {attempt + 1} attempt(s) over "
                                f"{time.monotonic() - start:.1f}s: {type(last).__name__}: {last}")

    def probe(self, endpoint: str, read_timeout_s: float) -> bool:
        """One GET, no retries: True on HTTP 200, False on any other answer or no answer."""
        try:
            resp = self.session.get(self.base_url + endpoint, timeout=(self.config.connect_timeout_s, read_timeout_s))
        except requests.RequestException:
            return False
        return resp.status_code == 200

    def close(self) -> None:
        self.session.close()


def error_text(resp: requests.Response) -> str:
    """The message of an SGLang error body ({"error": {"message"}} / {"message"} / {"detail"}) or raw text."""
    try:
        body = resp.json()
    except ValueError:
        return repr(resp.text[:300])
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if key in body:
                return str(body[key])
    return repr(str(body)[:300])
