"""Paragraph corpus: JSONL/Parquet reading, validation, length filters, DP striding, determinism, exact resume."""
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_pz.data.corpus import CorpusConfig, CorpusReader
from megatron_pz.data.shards import Paragraph, estimate_tokens, resolve_shards, sample_corpus_path
from megatron_pz.errors import CheckpointError, ConfigError, DataError


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def para(i, words=20):
    return {"id": f"p{i}", "title": f"T{i % 3}", "text": " ".join([f"w{i}"] * words)}


@pytest.fixture
def two_shards(tmp_path):
    """Two shards, 25 + 17 paragraphs, ids p0..p41."""
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [para(i) for i in range(25)])
    write_jsonl(d / "b.jsonl", [para(i) for i in range(25, 42)])
    return d


def ids(reader, n=None):
    return [p.id for p in (reader if n is None else itertools.islice(reader, n))]


def no_filter(**kw):
    return CorpusConfig(min_paragraph_tokens=0, **kw)


def test_reads_jsonl_in_order_without_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"id": "a", "title": "A", "text": "first paragraph"},
        "",  # blank lines are not records
        {"text": "no id or title"},
        {"id": 7, "title": None, "text": "numeric id"},
    ])
    out = list(CorpusReader(no_filter(paths=[str(path)], shuffle=False, num_epochs=1)))
    assert out == [
        Paragraph("a", "A", "first paragraph"),
        Paragraph("x.jsonl:3", "", "no id or title"),
        Paragraph("7", "", "numeric id"),
    ]


def test_parquet_equals_jsonl(tmp_path):
    records = [para(i) for i in range(10)]
    write_jsonl(tmp_path / "x.jsonl", records)
    pq.write_table(pa.table({k: [r[k] for r in records] for k in ("id", "title", "text")}), tmp_path / "y.parquet")
    from_jsonl = list(CorpusReader(no_filter(paths=[str(tmp_path / "x.jsonl")], shuffle=False, num_epochs=1)))
    from_parquet = list(CorpusReader(no_filter(paths=[str(tmp_path / "y.parquet")], shuffle=False, num_epochs=1)))
    assert from_jsonl == from_parquet and len(from_jsonl) == 10


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "y.parquet")
    with pytest.raises(DataError, match=r"y\.parquet: Parquet file has no 'text' column"):
        next(CorpusReader(no_filter(paths=[str(tmp_path / "y.parquet")])))


@pytest.mark.parametrize(
    "bad, message",
    [("{not json", "not valid JSON"), ('{"id": "x"}', "missing or empty 'text'"),
     ('{"text": "   "}', "missing or empty 'text'"), ('{"text": 5}', "missing or empty 'text'"),
     ('["a list"]', "expected a JSON object")],
)
def test_bad_line_error_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [para(0), para(1), bad, para(3)])
    reader = CorpusReader(no_filter(paths=[str(path)], shuffle=False))
    assert ids(reader, 2) == ["p0", "p1"]
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {message}"):
        next(reader)


def test_invalid_utf8_line_is_a_bad_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    reader = CorpusReader(no_filter(paths=[str(path)], shuffle=False))
    assert next(reader).text == "fine"
    with pytest.raises(DataError, match=r"bin\.jsonl:2: not valid UTF-8"):
        next(reader)


def test_bad_line_skip_counts(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [para(0), "{oops", '{"text": ""}', para(3)])
    reader = CorpusReader(no_filter(paths=[str(path)], shuffle=False, num_epochs=1, on_bad_line="skip"))
    assert ids(reader) == ["p0", "p3"]
    assert reader.stats["bad"] == 2 and reader.stats["yielded"] == 2


def test_token_length_filters(tmp_path):
    # word counts 1..9; keep min 3 <= n and n + overhead 4 + margin 0 <= 10, i.e. 3 <= n <= 6
    path = write_jsonl(tmp_path / "x.jsonl", [{"id": str(n), "text": " ".join(["w"] * n)} for n in range(1, 10)])
    cfg = CorpusConfig(paths=[str(path)], shuffle=False, num_epochs=1, min_paragraph_tokens=3,
                       max_prompt_tokens=10, prompt_margin_tokens=0)
    reader = CorpusReader(cfg, count_tokens=lambda t: len(t.split()), prompt_overhead_tokens=4)
    assert ids(reader) == ["3", "4", "5", "6"]
    assert reader.stats["too_short"] == 2 and reader.stats["too_long"] == 3
    # A restating prompt (prompt.pred_restate) may hold the paragraph twice: 2n + 4 <= 10, so n = 3 only; the
    # lower bound still reads one copy.
    reader = CorpusReader(cfg, count_tokens=lambda t: len(t.split()), prompt_overhead_tokens=4, paragraph_copies=2)
    assert ids(reader) == ["3"]


def test_default_filter_is_the_1536_token_prompt_cap(tmp_path):
    # estimate_tokens = bytes // 3 + 1; with overhead 100 and margin 8, the cap allows <= 1428 tokens
    ok, too_long = "a" * (1427 * 3), "a" * (1428 * 3)
    assert estimate_tokens(ok) == 1428 and estimate_tokens(too_long) == 1429
    path = write_jsonl(tmp_path / "x.jsonl", [{"id": "ok", "text": ok}, {"id": "long", "text": too_long}])
    reader = CorpusReader(CorpusConfig(paths=[str(path)], num_epochs=1), prompt_overhead_tokens=100)
    assert ids(reader) == ["ok"]


def test_drop_if_contains(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"id": "a", "text": "has [mask] inside"}, {"id": "b", "text": "clean"}])
    reader = CorpusReader(no_filter(paths=[str(path)], num_epochs=1))
    assert ids(reader) == ["b"] and reader.stats["dropped_substring"] == 1


def test_dp_ranks_partition_the_corpus(two_shards):
    everything = set(ids(CorpusReader(no_filter(paths=[str(two_shards)], num_epochs=1))))
    assert everything == {f"p{i}" for i in range(42)}
    per_rank = [ids(CorpusReader(no_filter(paths=[str(two_shards)], num_epochs=1), dp_rank=r, dp_world_size=4))
                for r in range(4)]
    assert sorted(itertools.chain(*per_rank)) == sorted(everything)
    assert [len(r) for r in per_rank] == [11, 11, 10, 10]  # 42 records dealt round-robin


def test_deterministic_order_per_seed_and_epoch(two_shards):
    def epochs(seed):
        return ids(CorpusReader(no_filter(paths=[str(two_shards)], seed=seed, num_epochs=2)))

    a, b = epochs(0), epochs(0)
    assert a == b and len(a) == 84
    assert a[:42] != a[42:] and sorted(a[:42]) == sorted(a[42:])  # new permutation each epoch, same set
    assert epochs(1) != a
    in_order = ids(CorpusReader(no_filter(paths=[str(two_shards)], shuffle=False, num_epochs=1)))
    assert in_order == [f"p{i}" for i in range(42)]


def test_cycles_forever_without_num_epochs(two_shards):
    reader = CorpusReader(no_filter(paths=[str(two_shards)]))
    assert len(ids(reader, 200)) == 200 and reader.epoch == 4


@pytest.mark.parametrize("k", [0, 1, 9, 20, 21, 42, 43, 70])
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_resume_is_exact(two_shards, k, rank, world):
    cfg = no_filter(paths=[str(two_shards)], seed=5)
    uninterrupted = ids(CorpusReader(cfg, dp_rank=rank, dp_world_size=world), 100)
    first = CorpusReader(cfg, dp_rank=rank, dp_world_size=world)
    head = ids(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = CorpusReader(cfg, dp_rank=rank, dp_world_size=world)
    resumed.load_state_dict(state)
    assert head + ids(resumed, 100 - k) == uninterrupted
    assert resumed.stats["yielded"] == 100


def test_resume_refuses_a_different_setup(two_shards):
    reader = CorpusReader(no_filter(paths=[str(two_shards)]))
    ids(reader, 3)
    state = reader.state_dict()
    with pytest.raises(CheckpointError, match="'seed' was 0 when saved but is 1 now"):
        CorpusReader(no_filter(paths=[str(two_shards)], seed=1)).load_state_dict(state)
    with pytest.raises(CheckpointError, match="'dp_world_size'"):
        CorpusReader(no_filter(paths=[str(two_shards)]), dp_rank=0, dp_world_size=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="missing or malformed"):
        CorpusReader(no_filter(paths=[str(two_shards)])).load_state_dict({"epoch": 0})


def test_everything_filtered_is_an_error_not_a_hang(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "short"}])
    with pytest.raises(DataError, match="no paragraph survived"):
        next(CorpusReader(CorpusConfig(paths=[str(path)], min_paragraph_tokens=100)))
    # a finite pass just ends empty
    assert list(CorpusReader(CorpusConfig(paths=[str(path)], min_paragraph_tokens=100, num_epochs=2))) == []


def test_shipped_sample():
    train, valid = sample_corpus_path("train"), sample_corpus_path("valid")
    assert len(list(CorpusReader(no_filter(paths=[str(valid)], num_epochs=1)))) == 200
    default = CorpusReader(CorpusConfig(num_epochs=1))  # paths=[] -> shipped train sample
    paragraphs = list(default)
    assert len(paragraphs) + sum(v for k, v in default.stats.items() if k != "yielded") == 2000
    assert len(paragraphs) > 1900 and all(p.id.startswith("enwiki-") for p in paragraphs)
    assert (train.parent / "README.md").read_text().count("CC BY-SA 3.0") >= 1
    with pytest.raises(ConfigError, match="split='test'"):
        sample_corpus_path("test")


def test_resolve_shards(tmp_path, two_shards):
    assert [p.name for p in resolve_shards([str(two_shards)])] == ["a.jsonl", "b.jsonl"]
    assert [p.name for p in resolve_shards([str(two_shards / "*.jsonl"), str(two_shards / "a.jsonl")])] == [
        "a.jsonl", "b.jsonl"]
    with pytest.raises(DataError, match="does not exist"):
        resolve_shards([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported corpus file type"):
        resolve_shards([str(tmp_path / "x.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl/.parquet shard"):
        resolve_shards([str(tmp_path / "empty")])


@pytest.mark.parametrize(
    "kwargs, field",
    [({"on_bad_line": "warn"}, "on_bad_line"), ({"num_epochs": 0}, "num_epochs"),
     ({"min_paragraph_tokens": -1}, "min_paragraph_tokens"), ({"max_prompt_tokens": 10, "min_paragraph_tokens": 10},
                                                               "max_prompt_tokens"),
     ({"paths": [""]}, "paths"), ({"drop_if_contains": "[mask]"}, "drop_if_contains")],
)
def test_corpus_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=f"corpus.{field}"):
        CorpusConfig(**kwargs)


def test_corpus_config_from_dict_and_bad_rank():
    cfg = CorpusConfig(**{"paths": "one.jsonl", "seed": 3})
    assert cfg.paths == ["one.jsonl"]
    with pytest.raises(ConfigError, match="dp_rank=2"):
        CorpusReader(CorpusConfig(), dp_rank=2, dp_world_size=2)
