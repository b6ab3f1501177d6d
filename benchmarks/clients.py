"""Many trainers on one rollout server: concurrent clients with mixed request sizes against ``serve-rollout``.

    python -m benchmarks.clients --model ~/.cache/megatron_pz/smollm2-135m-instruct/hf   # SmolLM2, 64 clients
    python -m benchmarks.clients --tiny --clients 64 --rounds 2                            # the tests' tiny model

One ``megatron-pz serve-rollout`` process (its own interpreter, as on a cluster node), then:
1. unloaded: ``--probes`` sequential 2-token requests (their median is the small request's unloaded latency), and
   ``--probes`` sequential requests of one full chunk of the largest kind (``--max-batch-size`` rows of its
   length): the time a small request may have to wait behind the batcher's current turn;
2. loaded: ``--clients`` threads, each sending ``--rounds`` requests of the mix below in its own order, all at once;
   the server's resident memory (its process tree, ``/proc``) sampled every 0.2 s throughout.

The mix (``KINDS``): small (2 new tokens, n = 1; what a health probe or a short-answer trainer sends), medium
(32 tokens, n = 4) and large (``--large-tokens``, n = 16: a trainer's prompt group). Every response is checked
(status 200, one item per sample, the asked token count). Reported: every status, the client errors and timeouts,
p50 / p99 of each kind, the bound the issue sets for small requests (5x the unloaded latency plus one chunk of the
largest) and the RSS before, at peak and after. Figures only: timing is never asserted in tests
(``tests/e2e/test_many_clients.py`` runs a small load on the tiny model and checks every answer).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from benchmarks.soak import proc_stats
from megatron_pz.parallel import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Kind:
    name: str
    prompt_tokens: int
    new_tokens: int
    n: int


def kinds(large_tokens: int) -> dict[str, Kind]:
    return {"small": Kind("small", 16, 2, 1), "medium": Kind("medium", 64, 32, 4),
            "large": Kind("large", 128, large_tokens, 16)}


MIX = ("small",) * 6 + ("medium",) * 3 + ("large",)  # one client's 10 draws: 60 % small, 30 % medium, 10 % large


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def body(kind: Kind, rng: random.Random, vocab: int) -> dict:
    ids = [rng.randrange(3, vocab) for _ in range(kind.prompt_tokens)]
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": kind.new_tokens, "n": kind.n, "temperature": 1.0,
                                                  "ignore_eos": True}}


def check_answer(kind: Kind, status: int, payload) -> str | None:
    """None when the answer is what was asked, else what is wrong."""
    if status != 200:
        return f"status {status}"
    items = payload if isinstance(payload, list) else [payload]
    if len(items) != kind.n:
        return f"{len(items)} items for n={kind.n}"
    for it in items:
        got = it.get("meta_info", {}).get("completion_tokens")
        if got != kind.new_tokens:
            return f"{got} completion tokens for max_new_tokens={kind.new_tokens} with ignore_eos"
    return None


@dataclass
class Outcome:
    kind: str
    status: int  # 0: no HTTP answer (connection error or client timeout)
    seconds: float
    problem: str | None


def send(session: requests.Session, url: str, key: str, kind: Kind, rng: random.Random, vocab: int,
         timeout_s: float) -> Outcome:
    t0 = time.perf_counter()
    try:
        r = session.post(f"{url}/generate", json=body(kind, rng, vocab), timeout=timeout_s,
                         headers={"Authorization": f"Bearer {key}"})
    except requests.RequestException as exc:
        return Outcome(kind.name, 0, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    dt = time.perf_counter() - t0
    try:
        payload = r.json()
    except ValueError:
        payload = None
    return Outcome(kind.name, r.status_code, dt, check_answer(kind, r.status_code, payload))


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children (``/proc``; 0 once gone)."""
    return proc_stats(pid)["rss"]


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.samples = pid, every_s, []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(rss_bytes(self.pid))
            self._halt.wait(self.every_s)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.samples, default=0)


def start_server(model: str, max_batch_size: int, threads: int | None, key: str, log: Path,
                 timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "megatron_pz.cli", "serve-rollout", "--model", model, "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--log-level", "WARNING", *(["--threads", str(threads)]
                                                                                 if threads else [])]
    env = dict(os.environ, MEGATRON_PZ_ROLLOUT_API_KEY=key, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-rollout exited with {proc.returncode}: see {log}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"serve-rollout did not answer /health within {timeout_s:.0f}s: see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def vocab_size(model: str) -> int:
    cfg = json.loads((Path(model) / "config.json").read_text())
    return int(cfg["vocab_size"])


def unloaded(url: str, key: str, kind: Kind, probes: int, vocab: int, timeout_s: float) -> list[float]:
    rng, out = random.Random(1), []
    with requests.Session() as s:
        for _ in range(probes):
            o = send(s, url, key, kind, rng, vocab, timeout_s)
            if o.problem:
                raise RuntimeError(f"unloaded {kind.name} request failed: {o.problem}")
            out.append(o.seconds)
    return out


def load(url: str, key: str, ks: dict[str, Kind], clients: int, rounds: int, vocab: int,
         timeout_s: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        rng = random.Random(1000 + i)
        order = [MIX[(i + r) % len(MIX)] for r in range(rounds)]  # every kind is in flight from the first round
        mine = []
        with requests.Session() as s:
            start.wait()
            for name in order:
                mine.append(send(s, url, key, ks[name], rng, vocab, timeout_s))
        with lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def summarize(outcomes: list[Outcome], small_unloaded: list[float], chunk_unloaded: list[float]) -> dict:
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    per_kind = {}
    for name in sorted({o.kind for o in outcomes}):
        secs = [o.seconds for o in outcomes if o.kind == name and o.status == 200]
        per_kind[name] = {"requests": sum(o.kind == name for o in outcomes), "p50_s": percentile(secs, 0.5),
                          "p99_s": percentile(secs, 0.99), "max_s": max(secs, default=float("nan"))}
    small0, chunk0 = statistics.median(small_unloaded), statistics.median(chunk_unloaded)
    bound = 5 * small0 + chunk0
    p99 = per_kind.get("small", {}).get("p99_s", float("nan"))
    problems = [o.problem for o in outcomes if o.problem]
    return {"requests": len(outcomes), "by_status": by_status,
            "server_errors": sum(o.status >= 500 for o in outcomes), "no_answer": sum(o.status == 0 for o in outcomes),
            "wrong_answers": len(problems), "first_problems": problems[:5], "per_kind": per_kind,
            "small_unloaded_s": small0, "largest_chunk_unloaded_s": chunk0, "small_p99_bound_s": bound,
            "small_p99_within_bound": bool(p99 <= bound)}


def report(s: dict, rss: dict) -> str:
    lines = [f"requests {s['requests']}: status {s['by_status']}, 5xx {s['server_errors']}, no answer "
             f"{s['no_answer']}, wrong answers {s['wrong_answers']}",
             "| kind | requests | p50 s | p99 s | max s |", "|---|---:|---:|---:|---:|"]
    for name, k in s["per_kind"].items():
        lines.append(f"| {name} | {k['requests']} | {k['p50_s']:.3f} | {k['p99_s']:.3f} | {k['max_s']:.3f} |")
    lines += [f"small unloaded {s['small_unloaded_s']:.3f} s, one chunk of the largest {s['largest_chunk_unloaded_s']:.3f}"
              f" s: bound 5x + chunk = {s['small_p99_bound_s']:.3f} s, small p99 "
              f"{'within' if s['small_p99_within_bound'] else 'OVER'} it",
              f"server RSS: {rss['before'] / 2**20:.0f} MiB before, {rss['peak'] / 2**20:.0f} MiB peak, "
              f"{rss['after'] / 2**20:.0f} MiB after"]
    return "\n".join(lines)


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_llama import make_tiny_llama  # the tests' random tiny Llama and byte tokenizer

    return str(make_tiny_llama(folder))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an HF folder")
    src.add_argument("--tiny", action="store_true", help="the tests' random tiny Llama (written to --out)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="requests each client sends, one after another")
    ap.add_argument("--probes", type=int, default=5, help="unloaded requests of each probed kind")
    ap.add_argument("--large-tokens", type=int, default=64, help="new tokens of the large kind")
    ap.add_argument("--max-batch-size", type=int, default=64, help="the server's rows per engine call (a chunk)")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="a client gives up on a request after this")
    ap.add_argument("--out", default="runs/bench_clients", help="folder for clients.json and the server's log")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(out / "tiny") if args.tiny else args.model
    ks = kinds(args.large_tokens)
    chunk = Kind("chunk", ks["large"].prompt_tokens, ks["large"].new_tokens, args.max_batch_size)
    key = os.urandom(16).hex()
    # A timeout's SIGTERM must still stop the server (the finally below), not orphan it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    proc, url = start_server(model, args.max_batch_size, args.threads, key, out / "server.log")
    try:
        vocab = vocab_size(model)
        unloaded(url, key, ks["small"], 2, vocab, args.timeout_s)  # warm-up: first calls allocate
        small0 = unloaded(url, key, ks["small"], args.probes, vocab, args.timeout_s)
        chunk0 = unloaded(url, key, chunk, max(1, args.probes // 2), vocab, args.timeout_s)
        before = rss_bytes(proc.pid)
        sampler = RssSampler(proc.pid)
        sampler.start()
        t0 = time.perf_counter()
        outcomes = load(url, key, ks, args.clients, args.rounds, vocab, args.timeout_s)
        wall = time.perf_counter() - t0
        peak = sampler.stop()
        after = rss_bytes(proc.pid)
        alive = proc.poll() is None
    finally:
        stop_server(proc)
    s = summarize(outcomes, small0, chunk0)
    rss = {"before": before, "peak": peak, "after": after}
    result = {"model": model, "clients": args.clients, "rounds": args.rounds, "mix": list(MIX),
              "kinds": {k: vars(v) for k, v in ks.items()}, "max_batch_size": args.max_batch_size,
              "wall_s": wall, "server_alive_after": alive, "rss_bytes": rss, **s}
    (out / "clients.json").write_text(json.dumps(result, indent=1))
    print(report(s, rss))
    print(f"load wall time {wall:.1f} s; server alive after: {alive}; figures in {out / 'clients.json'}")
    return 0 if (s["server_errors"] == s["no_answer"] == s["wrong_answers"] == 0 and alive) else 1


if __name__ == "__main__":
    raise SystemExit(main())
