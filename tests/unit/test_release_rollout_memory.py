"""``rollout.release_memory_in_train``: SGLang servers on the trainer's GPUs free their memory for the train phase
and take it back around the weight sync, in SGLang's order (weights before the update writes them, the KV cache
and CUDA graphs after it). A recording pool stands in for the servers; the calls go to the real ``train.py``
stages."""
from types import SimpleNamespace

import pytest
import torch

from megatron_pz.config import load_config
from megatron_pz.errors import ConfigError
from megatron_pz.trainer.connect import Engine


class RecordingPool:
    def __init__(self, log):
        self.log = log

    def release_memory_occupation(self, tags=None):
        self.log.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.log.append(("resume", tags))


class RecordingPublisher:
    def __init__(self, log):
        self.log, self.version = log, 0

    def export(self, chunks):
        return {}

    def publish(self, state):
        self.version += 1
        self.log.append(("publish", self.version))


def fake_run(release: bool):
    log = []
    cfg = load_config(None, ["rollout.backend=sglang", "rollout.urls=[http://a:1]"]
                      + (["rollout.release_memory_in_train=true"] if release else []))
    weights = RecordingPublisher(log)
    engine = Engine(cfg.rollout, weights_dir=None, pool=RecordingPool(log))
    rollout = SimpleNamespace(engine=engine, recover=lambda error, where: engine.recover(error, where, weights.version))
    # weight_version: only named in a failed sync's message
    return SimpleNamespace(cfg=cfg, rollout=rollout, weights=weights, chunks=[], weight_version=0), log


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)


def test_memory_is_released_for_training_and_resumed_around_the_weight_update():
    from megatron_pz.train import sync_weights

    run, log = fake_run(release=True)
    run.rollout.engine.release_memory()  # what update_policy does first
    sync_weights(run)
    assert log == [("release", None), ("resume", ["weights"]), ("publish", 1), ("resume", ["kv_cache", "cuda_graph"])]


def test_nothing_is_released_unless_asked():
    from megatron_pz.train import sync_weights

    run, log = fake_run(release=False)
    run.rollout.engine.release_memory()
    sync_weights(run)
    assert log == [("publish", 1)]


def test_release_needs_sglang_servers():
    with pytest.raises(ConfigError, match=r"release_memory_in_train=true .* needs rollout\.backend=sglang"):
        load_config(None, ["rollout.release_memory_in_train=true"])
