"""``megatron-pz eval --harness``: the shipped lm-evaluation-harness task over the embedded server's OpenAI endpoints
gives the figures lm-eval's own HF model gives on the same folder, and the CLI's errors are one line, exit 2."""
from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")

from megatron_pz.eval.harness import HARNESS_ENV, run_harness, task_manager  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread and tiny come from tests/conftest.py
TASK = "pz_wiki_lastword"
LIMIT = 12


@pytest.fixture()
def harness_env(monkeypatch):
    """The variables the harness sets, restored after the test (the CLI sets them for its whole process)."""
    for k in (*HARNESS_ENV, "OPENAI_API_KEY"):
        monkeypatch.setenv(k, os.environ.get(k, ""))


@pytest.fixture(scope="module")
def served(tiny):
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.server import RolloutServer, ServerConfig

    server = RolloutServer(EmbeddedEngine(tiny, max_batch_size=8), ServerConfig(port=0, api_key="k")).start()
    yield server
    server.stop()


def hf_reference(folder) -> dict:
    """lm-eval's ``--model hf`` on the same folder, task and documents."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model="hf", model_args={"pretrained": str(folder), "device": "cpu", "dtype": "float32"},
                          tasks=[TASK], limit=LIMIT, batch_size=1, task_manager=task_manager([TASK]),
                          log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0)
    return out["results"][TASK]


def test_shipped_task_over_the_server_equals_lm_eval_hf(served, tiny, harness_env):
    result = run_harness(served.url, [TASK], tiny, api_key="k", limit=LIMIT, batch_size=4)
    ours = result.metrics[TASK]
    assert result.samples[TASK] == LIMIT
    ref = hf_reference(tiny)
    assert round(ours["acc"], 3) == round(ref["acc,none"], 3)
    # A random model's word perplexity is astronomical (~1e20): compare its log, the mean log-likelihood.
    assert round(math.log(ours["perplexity"]), 3) == round(math.log(ref["perplexity,none"]), 3)
    assert ours["perplexity_stderr"] > 0 and "acc_stderr" in ours


GEN_TASK = """task: pz_gen
custom_dataset: !function gen_data.load
output_type: generate_until
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 6, do_sample: false}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
"""
GEN_DATA = """import json, datasets
from pathlib import Path
SHIPPED = Path({shipped!r})
def load(**_):
    rows = [json.loads(line) for line in SHIPPED.read_text().splitlines()][:3]
    return datasets.DatasetDict({{"test": datasets.Dataset.from_list(rows)}})
"""


def test_generation_tasks_through_completions_and_chat(served, tiny, tmp_path, harness_env):
    """A generate_until task (a user YAML via the include folder) through lm-eval's local-completions and
    local-chat-completions clients: every request they send is accepted, and the answers are the server's greedy
    completions cut at the task's stop strings."""
    import requests
    from lm_eval import simple_evaluate

    from megatron_pz.eval.harness import ASSETS, harness_env as env

    (tmp_path / "pz_gen.yaml").write_text(GEN_TASK)
    (tmp_path / "gen_data.py").write_text(GEN_DATA.format(shipped=str(ASSETS / "pz_wiki_lastword.jsonl")))
    result = run_harness(served.url, ["pz_gen"], tiny, api_key="k", include=[tmp_path], limit=3, batch_size=2)
    assert result.samples == {"pz_gen": 3} and 0 <= result.metrics["pz_gen"]["exact_match"] <= 1

    tok = served.engine.tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    try:
        with env():
            os.environ["OPENAI_API_KEY"] = "k"
            out = simple_evaluate(model="local-chat-completions",
                                  model_args={"model": "m", "base_url": served.url + "/v1/chat/completions"},
                                  tasks=["pz_gen"], limit=3, apply_chat_template=True, log_samples=True,
                                  bootstrap_iters=0, task_manager=task_manager(["pz_gen"], [tmp_path]))
        for sample in out["samples"]["pz_gen"]:
            (chat_json,), _ = sample["arguments"][0]  # the messages lm-eval sent, as a JSON string
            messages = json.loads(chat_json)
            direct = requests.post(served.url + "/v1/chat/completions", headers={"Authorization": "Bearer k"},
                                   json={"messages": messages, "max_tokens": 6, "temperature": 0,
                                         "stop": ["\n", "."]}, timeout=60).json()
            assert sample["resps"][0][0] == direct["choices"][0]["message"]["content"]
    finally:
        tok.chat_template = None


def test_training_eval_runs_harness_tasks_on_the_pool_server(served, tiny, harness_env):
    """What train.evaluate calls for eval.harness: the pool's server and key, the run's HF tokenizer folder, the
    metrics logged as eval/<task>/<metric>."""
    from megatron_pz.eval.harness import evaluate_harness
    from megatron_pz.eval.runner import flat_metrics
    from megatron_pz.model.tokenizer import load_tokenizer
    from megatron_pz.rollout.pool import RolloutPool
    from megatron_pz.rollout.sglang_client import ClientConfig

    pool = RolloutPool([served.url], client_config=ClientConfig(api_key="k"))
    try:
        results = evaluate_harness(pool, load_tokenizer(tiny), [TASK], [], limit=2, seed=0)
    finally:
        pool.close()
    logged = flat_metrics(results)
    assert logged[f"eval/{TASK}/n"] == 2.0 and f"eval/{TASK}/acc" in logged and f"eval/{TASK}/perplexity" in logged


def test_preflight_checks_harness_tasks_and_folders():
    from megatron_pz.errors import ConfigError
    from megatron_pz.eval.runner import EvalConfig
    from megatron_pz.trainer.preflight import check_eval_data

    check_eval_data(EvalConfig(interval=1, suites=[], harness=[TASK]))
    with pytest.raises(ConfigError, match="eval.harness_include /no/such/dir: not a folder"):
        check_eval_data(EvalConfig(interval=1, harness=[TASK], harness_include=["/no/such/dir"]))


def test_cli_runs_the_task_on_an_embedded_server(tiny, tmp_path, harness_env, capsys):
    from megatron_pz.cli import main

    out = tmp_path / "out"
    assert main(["eval", "--load", str(tiny), "--harness", TASK, "--limit", "3", "--out", str(out),
                 "--batch-size", "4"]) == 0
    doc = json.loads((out / "harness.json").read_text())
    assert doc["tasks"] == [TASK] and doc["server"] == "embedded (in-process)" and doc["limit"] == 3
    assert doc["samples"] == {TASK: 3} and set(doc["metrics"][TASK]) >= {"acc", "perplexity"}
    assert doc["lm_eval"]["n-samples"][TASK]["effective"] == 3
    assert "Bearer" not in (out / "harness.json").read_text()  # the generated API key is not written
    printed = capsys.readouterr().out
    assert TASK in printed and "perplexity" in printed and "harness.json" in printed


@pytest.mark.parametrize("args, needle", [
    ([], "nothing to evaluate: give --suite NAMES and/or --harness TASKS"),
    # An unknown name also searches lm-eval's own registry (~20-40 s to index here), hence slow.
    pytest.param(["--harness", "no_such_task"], "unknown lm-evaluation-harness task(s): no_such_task",
                 marks=pytest.mark.slow),
    (["--harness", "pz_wiki_lastword,"], "expected task names"),
    (["--harness", TASK, "--harness-include", "/no/such/dir"], "--harness-include /no/such/dir: not a folder"),
    (["--harness-fewshot", "2", "--suite", "mmlu"], "need --harness TASKS"),
])
def test_cli_bad_harness_arguments_exit_2_with_one_line(tiny, tmp_path, harness_env, capsys, args, needle):
    from megatron_pz.cli import main

    assert main(["eval", "--load", str(tiny), "--out", str(tmp_path), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("megatron-pz eval: error:"), lines
