"""Many trainers on one server: 64 concurrent clients with mixed request sizes against ``serve-rollout`` (a real
process on the tests' tiny model). Every request must be answered with what it asked for; no 5xx, no client
timeout, the server alive after. Latency is reported by ``python -m benchmarks.clients``, never asserted here."""
import json

from benchmarks.clients import MIX, main


def test_64_concurrent_clients_with_mixed_sizes_all_answered(tmp_path):
    rc = main(["--tiny", "--clients", "64", "--rounds", "2", "--probes", "2", "--threads", "1",
               "--timeout-s", "300", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "clients.json").read_text())
    assert rc == 0, result["first_problems"]
    assert result["requests"] == 128 and result["by_status"] == {"200": 128}
    assert result["server_errors"] == result["no_answer"] == result["wrong_answers"] == 0
    assert result["server_alive_after"]
    # every kind of the mix was in flight at once
    assert set(result["per_kind"]) == set(MIX)
    assert result["rss_bytes"]["peak"] >= result["rss_bytes"]["before"] > 0
