"""Suite loaders: shipped samples, seeded determinism, span validity, one-line DataErrors naming file and line."""
import json

import pytest

from megatron_pz.data.spans import SpanConfig, unmask, word_offsets
from megatron_pz.errors import ConfigError, DataError
from megatron_pz.eval.runner import EvalConfig
from megatron_pz.eval.suites import SUITES, get_suite, load_suite, parse_suites

SHIPPED = [n for n, s in SUITES.items() if s.sample is not None]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_samples_load(name):
    items = load_suite(name)
    assert len(items) >= 50
    assert len({it.id for it in items}) == len(items)
    assert all(it.kind == get_suite(name).kind and it.target and it.prompt_text for it in items)
    if get_suite(name).kind == "choice":
        assert all(it.target in "ABCDEFGHIJ"[: it.metadata["num_options"]] for it in items)
        assert all("\\boxed{}" in it.prompt_text and "\nB. " in it.prompt_text for it in items)
    if get_suite(name).kind == "math":
        assert all(it.prompt_text.endswith("put your final answer within \\boxed{}.") for it in items)


@pytest.mark.parametrize("name", ["wiki_span", "wiki_word", "squad_span"])
def test_span_items_are_valid_masks(name):
    mask = SpanConfig().mask_token
    for it in load_suite(name):
        body = it.prompt_text.split(":\n", 1)[1].rsplit("\nPlease reason", 1)[0]
        assert mask in body and mask not in it.target
        restored = unmask(body, it.target, mask)
        assert mask not in restored
        assert 0 < restored.count(it.target) < 8  # the span rules of training


def test_wiki_word_masks_one_word_of_the_same_paragraphs():
    words, spans = load_suite("wiki_word", seed=0), load_suite("wiki_span", seed=0)
    assert all(len(word_offsets(it.target)) == 1 for it in words)
    assert sum(len(word_offsets(it.target)) > 1 for it in spans) > len(spans) / 2  # SpanBERT lengths, mean ~4


def test_wiki_masks_depend_on_seed_only():
    a, b = load_suite("wiki_span", seed=0), load_suite("wiki_span", seed=0)
    assert [(i.id, i.target) for i in a] == [(i.id, i.target) for i in b]
    c = load_suite("wiki_span", seed=1)
    assert [i.target for i in a] != [i.target for i in c]
    # a limit picks items but never changes the mask of a paragraph
    by_id = {i.id: i.target for i in a}
    few = load_suite("wiki_span", limit=10, seed=0)
    assert len(few) == 10 and all(by_id[i.id] == i.target for i in few)
    ids = [i.id for i in a]
    assert [ids.index(i.id) for i in few] == sorted(ids.index(i.id) for i in few)  # file order kept


def test_squad_full_format_and_span_rules(tmp_path):
    doc = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "The cat sat on the mat, at a flat hat that a rat sat at.", "qas": [
            {"id": "q1", "question": "Who sat?", "answers": [{"text": "The cat", "answer_start": 0}]},
            {"id": "q2", "question": "Missing", "answers": [{"text": "a zebra", "answer_start": 0}]},
            {"id": "q3", "question": "Frequent", "answers": [{"text": "at", "answer_start": 0}]},
        ]}]}]}
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(doc))
    items = load_suite("squad_span", p)
    assert [(i.id, i.target) for i in items] == [("q1", "The cat")]
    assert "[mask] sat on the mat," in items[0].prompt_text


def test_math_layouts(tmp_path):
    p = tmp_path / "m.jsonl"
    rows = [{"question": "1+1?", "answer": "work\n#### 1,002"},
            {"problem": "p", "answer": 27.0, "id": 5},
            {"problem": "q", "solution": "so \\boxed{\\frac{1}{2}}"},
            {"question": "r", "final_answer": ["$3$", "4"], "unit": None}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_suite("gsm8k", p)
    assert [i.target for i in items] == ["1002", "27", "\\frac{1}{2}", "3, 4"]
    assert items[1].id == "5"


def test_choice_layouts(tmp_path):
    p = tmp_path / "c.jsonl"
    rows = [{"question": "Q1", "choices": ["a", "b", "c", "d"], "answer": "C"},
            {"question": "Q2", "options": ["a", "b", "c"], "answer_index": 1},
            {"question": "Q3\n Options are:\nA. x\nB. y\nC. z", "answer": "C. z"}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_suite("mmlu", p)
    assert [i.target for i in items] == ["C", "B", "C"]
    assert [i.metadata["num_options"] for i in items] == [4, 3, 3]
    assert "C. z" in items[2].prompt_text and "Options are" not in items[2].prompt_text


@pytest.mark.parametrize("content, where, what", [
    ('{"question": "q", "answer": "1"}\n{bad json\n', ":2:", "not valid JSON"),
    ('{"question": "q", "answer": "1"}\n[1, 2]\n', ":2:", "JSON object"),
    ('\n\n{"answer": "1"}\n', ":3:", "missing field"),
    ('{"question": "q"}\n', ":1:", "no gold answer"),
])
def test_bad_math_lines_name_file_and_line(tmp_path, content, where, what):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        load_suite("gsm8k", p)
    assert str(p) + where in str(e.value) and what in str(e.value) and "\n" not in str(e.value)


def test_bad_choice_and_missing_files(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q", "choices": ["a", "b"], "answer": "E"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no valid answer letter"):
        load_suite("mmlu", p)
    with pytest.raises(DataError, match="not found"):
        load_suite("mmlu", tmp_path / "nope.jsonl")
    (tmp_path / "squad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="squad.json: not a SQuAD JSON file"):
        load_suite("squad_span", tmp_path / "squad.json")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="bin.jsonl"):
        load_suite("gsm8k", tmp_path / "bin.jsonl")


def test_suite_names_and_eval_config_validation():
    assert parse_suites("wiki_span, mmlu,wiki_span") == ["wiki_span", "mmlu"]
    with pytest.raises(ConfigError, match="bogus"):
        parse_suites("wiki_span,bogus")
    with pytest.raises(ConfigError, match="needs --data|ships no"):
        load_suite("aime24")
    cfg = EvalConfig(suites="wiki_span,gsm8k")
    assert cfg.suites == ["wiki_span", "gsm8k"] and cfg.interval == 0
    for kw, field in [({"limit": 0}, "limit"), ({"interval": -1}, "interval"), ({"samples": 0}, "samples"),
                      ({"temperature": -1.0}, "temperature"), ({"suites": ["nope"]}, "suites"),
                      ({"suites": ["aime24"]}, "suites"), ({"data": {"nope": "x"}}, "data"),
                      ({"at_start": "yes"}, "at_start"), ({"max_new_tokens": True}, "max_new_tokens")]:
        with pytest.raises(ConfigError, match=f"EvalConfig.{field}"):
            EvalConfig(**kw)
    assert EvalConfig(suites=["aime24"], data={"aime24": "/x.jsonl"}).suites == ["aime24"]


def test_eval_config_harness_tasks():
    """eval.harness: lm-evaluation-harness task names (checked against lm-eval at preflight, not here); with them
    the built-in suites may be empty."""
    cfg = EvalConfig(suites=[], harness="pz_wiki_lastword, other", harness_include=["/tasks"])
    assert cfg.suites == [] and cfg.harness == ["pz_wiki_lastword", "other"] and cfg.harness_include == ["/tasks"]
    assert EvalConfig().harness == [] and EvalConfig().suites == ["wiki_span"]
    for kw, field in [({"suites": [], "harness": []}, "suites"), ({"harness": [""]}, "harness"),
                      ({"harness": [3]}, "harness"), ({"harness_include": "dir"}, "harness_include")]:
        with pytest.raises(ConfigError, match=f"EvalConfig.{field}"):
            EvalConfig(**kw)
