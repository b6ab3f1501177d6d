"""Two small pieces of the multi-node path: the ranks-per-host line the trainer logs at start-up, and where the
trainer finds the rollout servers' API key."""
from megatron_pz.config import RolloutConfig
from megatron_pz.parallel import format_hosts
from megatron_pz.rollout.launcher import API_KEY_ENV
from megatron_pz.trainer.connect import rollout_api_key


def test_format_hosts_groups_ranks_by_host():
    assert format_hosts(["n2", "n3"]) == "2 ranks on 2 hosts: n2 [0], n3 [1]"
    assert format_hosts(["a"]) == "1 rank on 1 host: a [0]"
    assert format_hosts(["a", "a", "b", "b", "b"]) == "5 ranks on 2 hosts: a [0-1], b [2-4]"
    assert format_hosts(["a", "b", "a"]) == "3 ranks on 2 hosts: a [0,2], b [1]"  # not a run: listed


def test_rollout_api_key_prefers_the_config_then_the_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert rollout_api_key(RolloutConfig()) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert rollout_api_key(RolloutConfig()) == "from-env"
    assert rollout_api_key(RolloutConfig(api_key="from-config")) == "from-config"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert rollout_api_key(RolloutConfig()) is None
