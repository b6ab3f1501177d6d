"""Several rollout servers behind one ``RolloutEngine`` and ``WeightUpdater``: balancing, concurrency limits,
fail-over, fan-out updates.

Generation: a batch of prompts is cut into small requests (``prompts_per_request``) sent concurrently from a
thread pool; each goes to the live server with the fewest requests in flight, never exceeding
``max_concurrency_per_server`` (SGLang batches concurrent requests itself, continuous batching). A request that
fails with ``ServerUnavailable`` (after the client's own retries) marks that server dead for ``dead_cooldown_s``
and is re-sent to another server; results come back in input order. With ``router_url`` (sglang-router),
generation goes to the router, which balances, and weight/control calls still go to every worker.

Weight updates go to every server concurrently. A server that misses an update is excluded from generation
until it is updated again, so no sample ever comes from weights other than the pool's current version.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megatron_pz.errors import RolloutError, UserError
from megatron_pz.rollout.http_transport import ServerUnavailable
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams
from megatron_pz.rollout.seeds import SEED_MOD, sample_seed
from megatron_pz.rollout.sglang_client import ClientConfig, SGLangClient

logger = logging.getLogger(__name__)


@dataclass
class PoolConfig:
    """Balancing and fail-over knobs."""

    max_concurrency_per_server: int = 32
    """Requests in flight per server (per router with ``router_url``)."""
    prompts_per_request: int = 1
    """Prompts per /generate request; each carries its n samples. Small requests balance and fail over finely."""
    dead_cooldown_s: float = 30.0
    """How long a server that failed is skipped before it is tried again."""
    max_dispatch_attempts: int | None = None
    """Servers one request may be tried on; default: every server once, plus one."""
    split_seeded: bool = False
    """Send a seeded request for n > 1 samples as n requests of one sample, each with its own seed
    (``rollout/seeds.py``). SGLang applies a request's ``sampling_seed`` to all its samples, which would make the n
    samples of a group identical; its prefix cache still shares the prompt between them. The embedded server seeds
    each sample itself and needs no split (it gives the same responses either way)."""


@dataclass
class _Server:
    client: SGLangClient
    in_flight: int = 0
    dead_until: float = 0.0
    last_error: str = ""
    version: int | None = None  # last version this server acknowledged (None: never updated by us)
    stale: bool = False  # missed the pool's latest weight update

    @property
    def url(self) -> str:
        return self.client.base_url


def read_endpoints_file(path: str | Path) -> list[str]:
    """One URL per line; blank lines and ``#`` comments ignored."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"endpoints file {p} does not exist")
    urls = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not urls:
        raise UserError(f"endpoints file {p} lists no servers")
    return urls


class RolloutPool:
    """``RolloutEngine`` and ``WeightUpdater`` over many servers (see module docstring)."""

    def __init__(self, endpoints: Sequence[str], config: PoolConfig | None = None,
                 client_config: ClientConfig | None = None, router_url: str | None = None):
        if not endpoints and not router_url:
            raise UserError("RolloutPool needs at least one endpoint or a router_url")
        self.config = config or PoolConfig()
        cc = client_config or ClientConfig()
        self.servers = [_Server(SGLangClient(url, cc)) for url in endpoints]
        self.router = _Server(SGLangClient(router_url, cc)) if router_url else None
        self._gen_servers = [self.router] if self.router else self.servers
        self._limit = self.config.max_concurrency_per_server * (max(1, len(self.servers)) if self.router else 1)
        self._cond = threading.Condition()
        self._target_version: int | None = None
        workers = min(512, self._limit * len(self._gen_servers))
        self._executor = ThreadPoolExecutor(max_workers=max(4, workers), thread_name_prefix="rollout-pool")

    @classmethod
    def from_endpoints_file(cls, path: str | Path, **kwargs: Any) -> RolloutPool:
        return cls(read_endpoints_file(path), **kwargs)

    @property
    def clients(self) -> list[SGLangClient]:
        """Per-worker clients (``weight_sync.DistributedWeightSync`` needs each server's rank)."""
        return [s.client for s in self.servers] or [self.router.client]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        if self.config.split_seeded and params.seed is not None and params.n > 1:
            return self._generate_split(prompts, params)
        k = max(1, self.config.prompts_per_request)
        chunks = [list(range(i, min(i + k, len(prompts)))) for i in range(0, len(prompts), k)]
        futures = [self._executor.submit(self._dispatch, [prompts[i] for i in chunk], seeded(params, chunk[0]))
                   for chunk in chunks]
        results: list[list[GenerationResult]] = []
        for chunk, fut in zip(chunks, futures):
            for i, group in zip(chunk, fut.result()):
                for r in group:
                    r.prompt_index = i
                results.append(group)
        return results

    def _generate_split(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                        ) -> list[list[GenerationResult]]:
        """One request per (prompt, sample), n = 1, seeded with that sample's own seed (``split_seeded``)."""
        jobs = [(i, sample_params(params, i, j)) for i in range(len(prompts)) for j in range(params.n)]
        futures = [self._executor.submit(self._dispatch, [prompts[i]], p) for i, p in jobs]
        results: list[list[GenerationResult]] = [[] for _ in prompts]
        for (i, _), fut in zip(jobs, futures):
            (group,) = fut.result()
            for r in group:
                r.prompt_index = i
            results[i] += group
        return results

    def input_top_logprobs(self, prompts: Sequence[Sequence[int]], top_k: int) -> list[list[list[float]]]:
        k = max(1, self.config.prompts_per_request)
        futures = [self._executor.submit(self._dispatch, list(prompts[i:i + k]), None,
                                         lambda c, ps: c.input_top_logprobs(ps, top_k))
                   for i in range(0, len(prompts), k)]
        return [rows for fut in futures for rows in fut.result()]

    def _dispatch(self, prompts: list[Sequence[int]], params: SamplingParams | None,
                  call: Callable[[SGLangClient, list[Sequence[int]]], Any] | None = None) -> list:
        """``client.generate(prompts, params)`` (or ``call(client, prompts)``) on a live server, failing over."""
        attempts = self.config.max_dispatch_attempts or len(self._gen_servers) + 1
        tried: set[str] = set()
        errors: list[str] = []
        for _ in range(attempts):
            server = self._acquire(tried)
            try:
                return call(server.client, prompts) if call else server.client.generate(prompts, params)
            except ServerUnavailable as exc:
                self._mark_dead(server, str(exc))
                tried.add(server.url)
                errors.append(str(exc))
            finally:
                self._release(server)
        what = "generation" if call is None else "scoring"
        raise RolloutError(f"{what} of {len(prompts)} prompt(s) failed on every server tried: " + " | ".join(errors))

    def _eligible(self, server: _Server, now: float) -> bool:
        return server.dead_until <= now and not server.stale

    def _acquire(self, tried: set[str]) -> _Server:
        """Block until a live server has a free slot; prefer untried servers, then the least loaded."""
        with self._cond:
            while True:
                now = time.monotonic()
                live = [s for s in self._gen_servers if self._eligible(s, now)]
                if not live:
                    raise RolloutError("no live rollout server: " + "; ".join(
                        f"{s.url}: {'stale weights' if s.stale else s.last_error or 'dead'}" for s in self._gen_servers))
                fresh = [s for s in live if s.url not in tried] or live
                free = [s for s in fresh if s.in_flight < self._limit]
                if free:
                    best = min(free, key=lambda s: s.in_flight)
                    best.in_flight += 1
                    return best
                # All at their limit: wait for a release (or a server's cooldown to end).
                self._cond.wait(timeout=1.0)

    def _release(self, server: _Server) -> None:
        with self._cond:
            server.in_flight -= 1
            self._cond.notify_all()

    def _mark_dead(self, server: _Server, reason: str) -> None:
        with self._cond:
            now = time.monotonic()
            newly = server.dead_until <= now  # requests failing together on one server log it once
            server.dead_until = now + self.config.dead_cooldown_s
            server.last_error = reason
        if newly:
            logger.error("rollout server %s marked dead for %.0fs: %s", server.url, self.config.dead_cooldown_s,
                         reason)

    def revive(self, version: int, drain_timeout_s: float = 120.0) -> None:
        """Take every server back at weight ``version``: after the servers were restarted with those weights
        (``trainer/connect.py``). Waits (up to ``drain_timeout_s``) for requests of the failed attempt still in
        flight, so that none of them marks a server dead again after this; then clears the dead and stale marks."""
        with self._cond:
            deadline = time.monotonic() + drain_timeout_s
            while any(s.in_flight for s in self._gen_servers) and time.monotonic() < deadline:
                self._cond.wait(timeout=0.5)
            for s in [*self.servers, *([self.router] if self.router else [])]:
                s.dead_until, s.last_error, s.stale, s.version = 0.0, "", False, version
            self._target_version = version
            self._cond.notify_all()

    # ---------------------------------------------------------------- fan-out calls

    def _fan_out(self, fn: Callable[[SGLangClient], Any], what: str, servers: list[_Server] | None = None
                 ) -> dict[str, BaseException | None]:
        if servers is None:
            servers = self.servers or [self.router]
        futures = {s.url: self._executor.submit(fn, s.client) for s in servers}
        out: dict[str, BaseException | None] = {}
        for url, fut in futures.items():
            try:
                fut.result()
                out[url] = None
            except Exception as exc:  # collected and reported together
                out[url] = exc
                logger.error("%s failed on %s: %s", what, url, exc)
        return out

    def _all_or_raise(self, fn: Callable[[SGLangClient], Any], what: str) -> None:
        errors = {u: e for u, e in self._fan_out(fn, what).items() if e is not None}
        if errors:
            raise RolloutError(f"{what} failed on {len(errors)} server(s): "
                               + "; ".join(f"{u}: {e}" for u, e in errors.items()))

    def _versioned_fan_out(self, fn: Callable[[SGLangClient], Any], version: int, what: str) -> None:
        """Apply a weight update everywhere; servers that miss it stop serving until updated again."""
        if self._target_version is not None and version <= self._target_version:
            raise RolloutError(f"{what}: version {version} is not above the pool's current version "
                               f"{self._target_version}")
        servers = self.servers or [self.router]
        results = self._fan_out(fn, what, servers)
        with self._cond:
            for s in servers:
                ok = results[s.url] is None
                s.stale = not ok
                if ok:
                    s.version = version
            self._target_version = version
        failed = {u: e for u, e in results.items() if e is not None}
        if len(failed) == len(servers):
            raise RolloutError(f"{what} v{version} failed on every server: "
                               + "; ".join(f"{u}: {e}" for u, e in failed.items()))
        if failed:
            logger.error("%s v%d missed by %d of %d servers; they are excluded until updated: %s", what, version,
                         len(failed), len(servers), list(failed))

    # ---------------------------------------------------------------- RolloutEngine / WeightUpdater

    def weight_version(self) -> int:
        if self._target_version is not None:
            return self._target_version
        versions = {s.client.weight_version() for s in (self.servers or [self.router])}
        return min(versions)

    def health(self) -> bool:
        return any(self.health_report().values())

    def health_report(self) -> dict[str, bool]:
        servers = self.servers or [self.router]
        futures = {s.url: self._executor.submit(s.client.health) for s in servers}
        return {u: f.result() for u, f in futures.items()}

    def update_weights_from_disk(self, model_path: str, version: int) -> None:
        self._versioned_fan_out(lambda c: c.update_weights_from_disk(model_path, version), version,
                                "update_weights_from_disk")

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], version: int | str,
                                   load_format: str | None = "flattened_bucket") -> None:
        # Colocated tensor updates address one engine (its own GPUs): use pool.clients[i] directly.
        raise RolloutError("update_weights_from_tensor targets one colocated engine; call it on pool.clients[i]")

    def init_weights_update_group(self, *args: Any, **kwargs: Any) -> None:
        raise RolloutError("each server needs its own rank_offset; use megatron_pz.weight_sync.DistributedWeightSync")

    def update_weights_from_distributed(self, *args: Any, **kwargs: Any) -> None:
        raise RolloutError("distributed updates are driven by megatron_pz.weight_sync.DistributedWeightSync")

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self._all_or_raise(lambda c: c.destroy_weights_update_group(group_name), "destroy_weights_update_group")

    def flush_cache(self) -> None:
        self._all_or_raise(lambda c: c.flush_cache(), "flush_cache")

    def pause_generation(self, mode: str = "abort") -> None:
        self._all_or_raise(lambda c: c.pause_generation(mode), "pause_generation")

    def continue_generation(self) -> None:
        self._all_or_raise(lambda c: c.continue_generation(), "continue_generation")

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._all_or_raise(lambda c: c.release_memory_occupation(tags), "release_memory_occupation")

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._all_or_raise(lambda c: c.resume_memory_occupation(tags), "resume_memory_occupation")

    def mark_updated(self, version: int, failed_urls: Sequence[str] = ()) -> None:
        """Record a weight update pushed around the pool (``megatron_pz.weight_sync``'s tensor/distributed paths)."""
        with self._cond:
            for s in self.servers or [self.router]:
                s.stale = s.url in failed_urls
                if not s.stale:
                    s.version = version
            self._target_version = version


def seeded(params: SamplingParams, offset: int) -> SamplingParams:
    """``params`` for the request whose first prompt is ``offset``: its seed is that prompt's seed (base seed +
    offset, ``rollout/seeds.py``), so every prompt keeps its stream however the batch is cut into requests."""
    if params.seed is None or offset == 0:
        return params
    return replace(params, seed=(params.seed + offset) % SEED_MOD)


def sample_params(params: SamplingParams, prompt: int, sample: int) -> SamplingParams:
    """``params`` for sample ``sample`` of prompt ``prompt`` sent alone (n = 1) with its own seed."""
    return replace(params, n=1, seed=sample_seed((params.seed + prompt) % SEED_MOD, sample))
