"""``megatron-pz eval`` end to end on a tiny random model, the Python API the trainer calls, and the HF export."""
import json
import subprocess
import sys

import pytest

from megatron_pz.eval.runner import EvalConfig, evaluate, flat_metrics, run_suite
from megatron_pz.rollout.protocol import GenerationResult


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "megatron_pz.cli", "eval", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def test_cli_writes_reports(tiny, tmp_path):
    out = tmp_path / "out"
    proc = cli("--load", tiny, "--suite", "wiki_span,mmlu,gsm8k", "--limit", "3", "--max-new-tokens", "6",
               "--out", out, "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "eval_report.md").exists() and "| wiki_span |" in (out / "eval_report.md").read_text()
    for suite in ("wiki_span", "mmlu", "gsm8k"):
        doc = json.loads((out / f"eval_{suite}.json").read_text())
        m = doc["metrics"]
        assert m["n"] == 3 == len(doc["records"]) and m["samples"] == 1
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["truncated_rate"] <= 1.0
        assert 0 < m["mean_response_tokens"] <= 6
        assert doc["config"]["temperature"] == 0.0 and doc["config"]["max_new_tokens"] == 6
        rec = doc["records"][0]
        assert {"prompt", "target", "responses"} <= rec.keys()
        assert {"response", "extracted", "correct", "tokens", "finish_reason"} <= rec["responses"][0].keys()
    assert "lenient_accuracy" in json.loads((out / "eval_wiki_span.json").read_text())["metrics"]
    gsm8k = json.loads((out / "eval_gsm8k.json").read_text())
    assert gsm8k["config"]["checker"].startswith(("math-verify", "light checker"))
    assert f"checker {gsm8k['config']['checker']}" in (out / "eval_report.md").read_text()
    assert "wiki_span" in proc.stdout and "accuracy" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["--suite", "nonsense"], "unknown eval suite 'nonsense'"),
    (["--suite", "aime24"], "aime24"),
    (["--suite", "mmlu", "--limit", "0"], "--limit"),
    (["--suite", "gsm8k", "--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
])
def test_cli_bad_arguments_exit_2_with_one_line(tiny, tmp_path, args, needle):
    proc = cli("--load", tiny, "--out", tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("megatron-pz eval: error:")


def test_cli_bad_load_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for load in (tmp_path / "missing", tmp_path / "empty"):
        proc = cli("--load", load, "--suite", "wiki_span", "--out", tmp_path / "o")
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(load) in lines[0]


class ScriptedEngine:
    """Answers every prompt with ``n`` canned responses: the first ``n_right`` box the target."""

    def __init__(self, targets_by_prompt, n_right):
        self.targets, self.n_right, self.calls = targets_by_prompt, n_right, 0

    def generate(self, prompts, params):
        self.calls += 1
        out = []
        for i, p in enumerate(prompts):
            target = self.targets[tuple(p)]
            out.append([GenerationResult(i, [1] * (j + 1), [0.0] * (j + 1), "stop" if j else "length", 0,
                                         text=f"so \\boxed{{{target if j < self.n_right else 'zzz'}}}")
                        for j in range(params.n)])
        return out


def test_run_suite_mean_and_pass_at_k_with_a_scripted_engine():
    from megatron_pz.eval.suites import load_suite

    items = load_suite("squad_span", limit=5, seed=3)
    encode = lambda s: [ord(c) % 250 for c in s]  # noqa: E731
    # plain style: the prompt is the item text itself, so the engine can look the target up
    targets = {tuple(encode(it.prompt_text)): it.target for it in items}
    engine = ScriptedEngine(targets, n_right=1)
    res = run_suite(engine, encode, None, "squad_span", limit=5, samples=4, temperature=None, top_p=None,
                    max_new_tokens=16, seed=3, prompt_style="plain")
    m = res.metrics
    assert m["n"] == 5 and m["samples"] == 4 and res.config["temperature"] == 0.6 and res.config["top_p"] == 0.95
    assert m["accuracy"] == pytest.approx(0.25) and m["lenient_accuracy"] == pytest.approx(0.25)
    assert m["pass@4"] == pytest.approx(1.0) and m["pass@1"] == pytest.approx(0.25)
    assert m["truncated_rate"] == pytest.approx(0.25) and m["mean_response_tokens"] == pytest.approx(2.5)
    assert [r["id"] for r in res.records] == [it.id for it in items]


class ContinuingEngine:
    """Continues every prompt: the right word for the first ``n_right`` items (by order of the call), else "zzz"."""

    def __init__(self, targets_by_prompt, n_right):
        self.targets, self.n_right, self.seen = targets_by_prompt, n_right, 0

    def generate(self, prompts, params):
        out = []
        for i, p in enumerate(prompts):
            word = self.targets[tuple(p)] if self.seen < self.n_right else "zzz"
            self.seen += 1
            out.append([GenerationResult(i, [1, 2], [0.0, 0.0], "length", 0, text=f" {word} and more")])
        return out


@pytest.mark.parametrize("cloze", [False, True])
def test_run_suite_restated_prompt_scores_the_continuation(cloze):
    """restate=True: the prompt is training's prediction prompt (ending with the restated sentence) and the first
    words are the answer; cloze=True: the same as plain text (prompt.pred_cloze)."""
    from megatron_pz.data.prompts import PromptConfig, prediction_prompt, restated_context
    from megatron_pz.eval.suites import load_suite

    items = load_suite("wiki_span", limit=4, seed=3)
    assert len(items) == 4 and all(restated_context(it.metadata["masked"]) for it in items)
    encode = lambda s: [ord(c) % 250 for c in s]  # noqa: E731
    cfg = PromptConfig(style="plain", pred_restate=True, pred_cloze=cloze)
    texts = [prediction_prompt(it.metadata["masked"], cfg) for it in items]
    assert all(t.endswith(restated_context(it.metadata["masked"])) for t, it in zip(texts, items))
    assert all(("\\boxed" in t) is not cloze for t in texts)
    targets = {tuple(encode(t)): it.target for t, it in zip(texts, items)}
    res = run_suite(ContinuingEngine(targets, n_right=3), encode, None, "wiki_span", limit=4, samples=1,
                    max_new_tokens=4, seed=3, prompt_style="plain", restate=True, cloze=cloze)
    assert res.config["restate"] is True and res.config["cloze"] is cloze and res.metrics["n"] == 4
    assert [r["responses"][0]["correct"] for r in res.records] == [True, True, True, False]
    assert res.metrics["accuracy"] == pytest.approx(0.75) and res.metrics["lenient_accuracy"] == pytest.approx(0.75)


def test_evaluate_api_with_the_embedded_engine(tiny, one_thread):
    from megatron_pz.model.tokenizer import load_tokenizer
    from megatron_pz.engine.engine import EmbeddedEngine

    tok = load_tokenizer(tiny)
    engine = EmbeddedEngine(tiny)
    cfg = EvalConfig(suites=["wiki_span", "mmlu_pro"], limit=2, max_new_tokens=4)
    out = evaluate(engine, tok.encode, None, cfg, prompt_style="chat")
    assert set(out) == {"wiki_span", "mmlu_pro"}
    assert out["wiki_span"]["n"] == 2 and 0 <= out["wiki_span"]["lenient_accuracy"] <= 1
    flat = flat_metrics(out)
    assert "eval/mmlu_pro/accuracy" in flat and all(isinstance(v, float) for v in flat.values())


@pytest.mark.slow
@pytest.mark.multiproc
def test_eval_a_training_run_dir_and_export_for_lm_eval(tiny, tmp_path):
    """A run dir (checkpoints/ without hf_tokenizer, tokenizer in hf_meta/) evaluates and exports to a folder that
    AutoModelForCausalLM and AutoTokenizer both load."""
    import os
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    conv = subprocess.run([sys.executable, "-m", "megatron_pz.cli", "convert", "--from", "hf", "--to", "mcore",
                           str(tiny), str(run / "checkpoints")], capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-2000:]
    shutil.move(str(run / "checkpoints" / "hf_tokenizer"), str(run / "hf_meta"))  # the trainer's layout
    env = dict(os.environ, MEGATRON_PZ_CACHE=str(tmp_path / "cache"))
    proc = cli("--load", run, "--suite", "wiki_span", "--limit", "2", "--max-new-tokens", "4", "--out",
               tmp_path / "out", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "eval_wiki_span.json").read_text())["metrics"]["n"] == 2
    assert len(list((tmp_path / "cache" / "hf_export").iterdir())) == 1
    proc = cli("--load", run, "--suite", "wiki_span", "--limit", "2", "--max-new-tokens", "4", "--out",
               tmp_path / "out", env=env)
    assert proc.returncode == 0 and "converting" not in proc.stderr  # cached

    # the plain converter finds the run's hf_meta/ next to checkpoints/ (convert.api.hf_aux_dir)
    exp = subprocess.run([sys.executable, "-m", "megatron_pz.cli", "convert", "--from", "mcore", "--to", "hf",
                          str(run / "checkpoints"), str(tmp_path / "hf_out")], capture_output=True, text=True,
                         timeout=600)
    assert exp.returncode == 0, exp.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf_out"))
    assert model.config.vocab_size == len(tok) and tok.decode(tok.encode("abc")) == "abc"
