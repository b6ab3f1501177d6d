"""End to end: the real ``megatron-pz serve-rollout`` CLI in subprocesses, started by the launcher, driven by the
pool client exactly as the trainer drives SGLang: generation, a weight sync over a gloo broadcast group (the NCCL
path's code, on CPU), a disk update, a server SIGKILLed mid-batch, and a clean SIGTERM shutdown.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from megatron_pz.rollout.launcher import ServerSpec, launch, stop_all
from megatron_pz.rollout.pool import PoolConfig, RolloutPool
from megatron_pz.rollout.protocol import SamplingParams
from megatron_pz.rollout.sglang_client import ClientConfig
from megatron_pz.weight_sync import DiskWeightSync, DistributedWeightSync, check_logprobs, check_weights

# tests/tiny_llama.py: pytest puts tests/ on sys.path, as for conftest
from tiny_llama import load_hf, make_tiny_llama, perturbed_state, reference_fn

NUM_GPUS = 0
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_rollout_cli_end_to_end(tmp_path):
    tiny = make_tiny_llama(tmp_path / "tiny")
    weights = tmp_path / "weights"
    weights.mkdir()
    specs = [ServerSpec(kind="embedded", model_path=str(tiny), port=free_port(), weights_dir=str(weights),
                        log_path=str(tmp_path / f"server{i}.log"), cwd=str(REPO),
                        extra_args=["--threads", "1", "--max-batch-size", "8"]) for i in range(2)]
    servers = launch(specs, endpoints_file=tmp_path / "endpoints.txt", health_timeout_s=180)
    try:
        assert (tmp_path / "endpoints.txt").read_text().split() == [s.url for s in servers]
        pool = RolloutPool.from_endpoints_file(
            tmp_path / "endpoints.txt", config=PoolConfig(dead_cooldown_s=300),
            client_config=ClientConfig(max_retries=1, backoff_s=0.05, generate_timeout_s=120))

        # 1. Generation through the production client.
        out = pool.generate([[1, 2, 3], [4, 5], [6]], SamplingParams(n=2, max_new_tokens=8, temperature=0.8,
                                                                     ignore_eos=True))
        assert [len(g) for g in out] == [2, 2, 2]
        assert all(len(r.response_ids) == 8 == len(r.logprobs) and r.weight_version == 0 for g in out for r in g)

        # 2. Weight sync over a broadcast group (gloo here, NCCL on GPUs), several buckets; then check mode.
        state = perturbed_state(tiny, scale=0.3)
        sync = DistributedWeightSync(pool.clients, "127.0.0.1", free_port(), backend="gloo", bucket_bytes=30_000)
        sync.init()
        report = sync.push(state.items(), 1)
        pool.mark_updated(1)
        assert report.num_buckets > 1 and report.num_tensors == len(state)
        for client in pool.clients:
            assert client.weight_version() == 1
            assert check_weights(client, state).ok
            assert check_logprobs(client, [7, 8, 9], reference_fn(load_hf(tiny, state)), atol=1e-4).ok
            assert not check_logprobs(client, [7, 8, 9], reference_fn(load_hf(tiny)), atol=1e-4).ok
        sync.close()

        # 3. Disk update through the pool (both servers), version 2.
        state2 = perturbed_state(tiny, scale=0.2, seed=9)
        DiskWeightSync(pool, weights, hf_config_dir=tiny).push(state2.items(), 2)
        assert all(c.weight_version() == 2 for c in pool.clients)

        # 4. A server killed (SIGKILL) mid-batch: its requests are re-sent to the other server.
        victim = servers[1]
        box = {}
        params = SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
        t = threading.Thread(target=lambda: box.setdefault("out", pool.generate([[i + 1] for i in range(8)], params)))
        t.start()
        deadline = time.monotonic() + 60
        while pool.servers[1].in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        victim.proc.kill()  # a request is in flight there (400 tokens take far longer than this loop's step)
        t.join(timeout=120)
        assert not t.is_alive()
        results = [r for g in box["out"] for r in g]
        assert len(results) == 8 and all(len(r.response_ids) == 400 and r.weight_version == 2 for r in results)
        assert pool.servers[1].dead_until > time.monotonic()
        pool.close()
    finally:
        stop_all(servers, grace_s=20)
    assert servers[0].proc.returncode == 0, servers[0].log_tail()  # clean exit on SIGTERM
    assert servers[1].proc.returncode == -9


def test_launcher_reports_a_server_that_cannot_start(tmp_path):
    from megatron_pz.errors import RolloutError

    spec = ServerSpec(kind="embedded", model_path=str(tmp_path / "missing"), port=free_port(),
                      log_path=str(tmp_path / "bad.log"), cwd=str(REPO))
    with pytest.raises(RolloutError, match="exited with code 2"):
        launch([spec], health_timeout_s=60)
