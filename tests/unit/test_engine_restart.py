"""Restarting a rollout server the trainer launched (rollout.max_engine_restarts): who is restarted, from which
weights, when the failure is raised instead, and how the pool takes a restarted server back.

``Engine.recover`` runs here in a one-process gloo group with stand-ins for the launched servers, the pool and
``launcher.relaunch``; tests/e2e/test_engine_restart_e2e.py kills a real server mid-step (slow).
"""
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_pz.config import RolloutConfig, load_config
from megatron_pz.errors import ConfigError, RolloutError
from megatron_pz.parallel import free_port
from megatron_pz.rollout import launcher
from megatron_pz.rollout.pool import RolloutPool
from megatron_pz.trainer.connect import Engine


@pytest.fixture(scope="module")
def one_rank():
    if torch.distributed.is_initialized():  # another test's group: use it
        yield
        return
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


class Server:
    def __init__(self, url, code=None):
        self.url, self.code = url, code
        self.proc = SimpleNamespace(poll=lambda: self.code)

    def alive(self):
        return self.code is None


class Pool:
    def __init__(self):
        self.revived = []

    def revive(self, version):
        self.revived.append(version)


def fake_engine(tmp_path, servers, backend="embedded", restarts=0, **rollout):
    r = RolloutConfig(backend=backend, **rollout)
    return Engine(r, Path(r.weights_dir or tmp_path / "weights").resolve(), pool=Pool(), servers=servers,
                  restarts=restarts)


def recover_rollout(engine, error, where):
    return engine.recover(error, where, version=7)


@pytest.fixture
def relaunches(monkeypatch):
    calls = []

    def relaunch(old, model_path, version, health_timeout_s):
        calls.append((old.url, model_path, version))
        return Server(old.url + "#new")

    monkeypatch.setattr(launcher, "relaunch", relaunch)
    return calls


def test_a_dead_launched_server_is_restarted_from_the_current_version_and_the_stage_retried(
        tmp_path, one_rank, relaunches, caplog):
    run = fake_engine(tmp_path, [Server("http://a", code=-9), Server("http://b")])
    with caplog.at_level(logging.WARNING, logger="megatron_pz.trainer.connect"):
        assert recover_rollout(run, RolloutError("generation failed"), "step 3: rollout") is True
    assert relaunches == [("http://a", str((tmp_path / "weights" / "v00000007").resolve()), 7)]
    assert [s.url for s in run.servers] == ["http://a#new", "http://b"]  # the live one is left alone
    assert run.restarts == 1 and run.pool.revived == [7]
    [record] = caplog.records  # one line per event
    assert "step 3: rollout: rollout server http://a died (exit code -9)" in record.getMessage()
    assert "restart 1 of rollout.max_engine_restarts=3" in record.getMessage()


def test_a_custom_weights_dir_is_where_the_restart_reads(tmp_path, one_rank, relaunches):
    run = fake_engine(tmp_path, [Server("http://a", code=1)], weights_dir=str(tmp_path / "shared"))
    assert recover_rollout(run, RolloutError("x"), "weight sync to version 7")
    assert relaunches[0][1] == str((tmp_path / "shared" / "v00000007").resolve())


def test_nothing_failed_nothing_restarted(tmp_path, one_rank, relaunches):
    run = fake_engine(tmp_path, [Server("http://a", code=-9)])
    assert recover_rollout(run, None, "step 1: rollout") is False
    assert relaunches == [] and run.pool.revived == []


@pytest.mark.parametrize("case", ["server alive", "budget spent", "restarts off", "external"])
def test_the_failure_is_raised_when_no_restart_applies(tmp_path, one_rank, relaunches, case):
    servers = [Server("http://a", code=None if case == "server alive" else -9)]
    kwargs = {"budget spent": {"restarts": 3}, "restarts off": {"max_engine_restarts": 0},
              "external": {"backend": "sglang", "weight_sync": "disk"}}.get(case, {})
    run = fake_engine(tmp_path, servers, **kwargs)
    error = RolloutError("generation of 1 prompt(s) failed on every server tried")
    with pytest.raises(RolloutError) as exc:
        recover_rollout(run, error, "step 2: rollout")
    assert exc.value is error  # the rank's own error: train_cli.main_from_args makes it exit status 3
    assert relaunches == [] and run.pool.revived == []


def test_a_restart_that_fails_raises_the_original_error(tmp_path, one_rank, monkeypatch):
    def relaunch(*args, **kwargs):
        raise RolloutError("not healthy after 600s")

    monkeypatch.setattr(launcher, "relaunch", relaunch)
    run = fake_engine(tmp_path, [Server("http://a", code=-9)])
    error = RolloutError("generation failed")
    with pytest.raises(RolloutError) as exc:
        recover_rollout(run, error, "step 2: rollout")
    assert exc.value is error and run.pool.revived == []


def test_max_engine_restarts_is_checked():
    assert load_config(None).rollout.max_engine_restarts == 3
    with pytest.raises(ConfigError, match=r"rollout\.max_engine_restarts must be >= 0"):
        load_config(None, ["rollout.max_engine_restarts=-1"])


def test_the_pool_takes_restarted_servers_back_at_the_version(caplog):
    pool = RolloutPool([f"http://127.0.0.1:{free_port()}"])
    try:
        server = pool.servers[0]
        with caplog.at_level(logging.ERROR, logger="megatron_pz.rollout.pool"):
            pool._mark_dead(server, "connection refused")
            pool._mark_dead(server, "connection refused")  # a second request failing on it: no second line
        assert len(caplog.records) == 1
        server.stale = True
        with pytest.raises(RolloutError, match="no live rollout server"):
            pool._acquire(set())
        pool.revive(4)
        assert pool._acquire(set()) is server and pool.weight_version() == 4
        pool._release(server)
        assert (server.dead_until, server.stale, server.version, server.in_flight) == (0.0, False, 4, 0)
    finally:
        pool.close()
