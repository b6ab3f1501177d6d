"""tools/prepare_corpus.py: JSONL/text dumps -> shards + manifest, dedup, filters, deterministic sample."""
import importlib.util
import json
from pathlib import Path

import pytest

from megatron_pz.data.corpus import CorpusConfig, CorpusReader

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("prepare_corpus", ROOT / "tools" / "prepare_corpus.py")
prepare_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_corpus)


def read_all(out):
    return list(CorpusReader(CorpusConfig(paths=[str(out)], shuffle=False, num_epochs=1, min_paragraph_tokens=0)))


def test_jsonl_to_jsonl_shards_with_dedup_and_char_filters(tmp_path):
    src = tmp_path / "dump.jsonl"
    rows = [{"id": f"r{i}", "title": "T", "text": f"paragraph number {i} " + "x" * i} for i in range(10)]
    rows.insert(5, {"id": "dup", "text": rows[2]["text"] + "  "})  # exact duplicate after stripping
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert prepare_corpus.main([str(src), "--out", str(out), "--records-per-shard", "3",
                                "--min-chars", "20", "--max-chars", "27"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    # lengths are 19 + i: kept i = 1..8 (20..27 chars); i = 0 too short, 9 too long, "dup" dropped
    assert manifest["counts"] == {"read": 11, "bad": 0, "duplicate": 1, "too_short": 1, "too_long": 1, "kept": 8}
    assert [s["records"] for s in manifest["shards"]] == [3, 3, 2]
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    assert manifest["inputs"][0]["sha256"] == prepare_corpus.sha256_file(src)
    assert [p.id for p in read_all(out)] == [f"r{i}" for i in range(1, 9)]


def test_text_dump_to_parquet(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("First paragraph\nstill first.\n\nSecond one.\n\n\nThird.\n")
    out = tmp_path / "out"
    assert prepare_corpus.main([str(src), "--out", str(out), "--format", "parquet", "--text-split", "blank"]) == 0
    paragraphs = read_all(out)
    assert [(p.id, p.text) for p in paragraphs] == [
        ("book-000000", "First paragraph still first."), ("book-000001", "Second one."), ("book-000002", "Third.")]
    assert (out / "shard-00000.parquet").exists()
    out_lines = tmp_path / "out_lines"
    prepare_corpus.main([str(src), "--out", str(out_lines)])
    assert [p.text for p in read_all(out_lines)] == ["First paragraph", "still first.", "Second one.", "Third."]


def test_sample_is_deterministic_and_keeps_source_order(tmp_path):
    src = tmp_path / "dump.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i:03d}", "text": f"text {i}"}) + "\n" for i in range(100)))
    picks = []
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(picks)}"
        prepare_corpus.main([str(src), "--out", str(out), "--sample", "10", "--seed", str(seed)])
        picks.append([p.id for p in read_all(out)])
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert len(picks[0]) == 10 and picks[0] == sorted(picks[0])


def test_bad_lines_and_errors(tmp_path, capsys):
    src = tmp_path / "dump.jsonl"
    src.write_bytes(b'{"text": "ok"}\nnot json\n{"text": "\xff"}\n')
    assert prepare_corpus.main([str(src), "--out", str(tmp_path / "o")]) == 2
    assert "dump.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert prepare_corpus.main([str(src), "--out", str(tmp_path / "o"), "--on-bad-line", "skip"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["counts"]["bad"] == 2
    assert prepare_corpus.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\n")
    assert prepare_corpus.main([str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "bin.txt: not valid UTF-8 (byte 3)" in capsys.readouterr().err
    assert prepare_corpus.main([str(src), "--out", str(tmp_path / "o"), "--max-tokens", "5"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_shipped_sample_matches_its_manifest():
    base = ROOT / "megatron_pz" / "assets" / "wiki_sample"
    for split, n in (("train", 2000), ("valid", 200)):
        manifest = json.loads((base / split / "manifest.json").read_text())
        assert manifest["records"] == n
        for shard in manifest["shards"]:
            assert prepare_corpus.sha256_file(base / split / shard["file"]) == shard["sha256"]


@pytest.mark.skipif(not Path("/work/shared/data/wiki/valid.jsonl").exists(), reason="needs shared/data/wiki")
def test_shipped_valid_sample_is_reproducible(tmp_path):
    out = tmp_path / "valid"
    prepare_corpus.main(["/work/shared/data/wiki/valid.jsonl", "--out", str(out), "--sample", "200", "--seed", "0",
                         "--records-per-shard", "1000"])
    shipped = ROOT / "megatron_pz" / "assets" / "wiki_sample" / "valid" / "shard-00000.jsonl"
    assert (out / "shard-00000.jsonl").read_bytes() == shipped.read_bytes()
