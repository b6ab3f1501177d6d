#!/usr/bin/env python3
"""Turn JSONL or plain-text dumps into paragraph shards (JSONL or Parquet) plus a manifest.

Input records are ``{"id", "title", "text"}`` JSONL lines (``id``/``title`` optional) or plain text, where a
paragraph is a non-empty line (``--text-split lines``) or a block separated by blank lines (``--text-split
blank``). Steps, in order: read -> exact de-duplication (on the stripped text; first occurrence kept) ->
length filters (characters, and tokens when ``--tokenizer`` is given) -> optional deterministic sample
(``--sample N``: the N records with the smallest sha256(seed, id), kept in input order) -> shards of
``--records-per-shard`` records -> ``manifest.json`` (inputs with sha256, filters, counts, shards with sha256).

Example (this is how ``megatron_pz/assets/wiki_sample`` was made; see its README.md):

    python tools/prepare_corpus.py ../shared/data/wiki/train.jsonl --out megatron_pz/assets/wiki_sample/train \\
        --sample 2000 --seed 0 --records-per-shard 1000
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import megatron_pz  # noqa: F401
except ModuleNotFoundError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_pz.data.shards import Paragraph, parse_record  # noqa: E402
from megatron_pz.errors import DataError, UserError  # noqa: E402


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_text_dump(path: Path, split: str) -> Iterator[Paragraph]:
    """Paragraphs of a plain-text dump: one per non-empty line ("lines") or per blank-line block ("blank")."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from exc
    blocks = text.split("\n") if split == "lines" else text.split("\n\n")
    k = 0
    for block in blocks:
        para = " ".join(block.split()) if split == "blank" else block.strip()
        if para:
            yield Paragraph(id=f"{path.stem}-{k:06d}", title="", text=para)
            k += 1


def read_jsonl_dump(path: Path, on_bad_line: str, counts: dict[str, int]) -> Iterator[Paragraph]:
    """Validated paragraphs of a JSONL dump (``shards.parse_record`` rules); bad lines raise or are counted."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    line: str | bytes = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw  # parse_record reports it as "not valid UTF-8" with its line number
                yield parse_record(path, number, line)
            except DataError:
                if on_bad_line == "error":
                    raise
                counts["bad"] += 1


def select_sample(paragraphs: list[Paragraph], n: int, seed: int) -> list[Paragraph]:
    """The ``n`` paragraphs with the smallest sha256(f"{seed}:{id}"), in their original order."""
    if n >= len(paragraphs):
        return paragraphs
    key = {id(p): hashlib.sha256(f"{seed}:{p.id}".encode()).hexdigest() for p in paragraphs}
    chosen = {id(p) for p in sorted(paragraphs, key=lambda p: key[id(p)])[:n]}
    return [p for p in paragraphs if id(p) in chosen]


def write_shards(paragraphs: list[Paragraph], out: Path, fmt: str, per_shard: int) -> list[dict[str, Any]]:
    """Write ``shard-NNNNN.<fmt>`` files of at most ``per_shard`` records; return their manifest entries."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, start in enumerate(range(0, len(paragraphs), per_shard)):
        chunk = paragraphs[start : start + per_shard]
        path = out / f"shard-{index:05d}.{fmt}"
        if fmt == "jsonl":
            with open(path, "w", encoding="utf-8") as f:
                for p in chunk:
                    f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({k: [getattr(p, k) for p in chunk] for k in ("id", "title", "text")})
            pq.write_table(table, path)
        entries.append({"file": path.name, "records": len(chunk), "sha256": sha256_file(path)})
    return entries


def make_token_counter(tokenizer: str | None) -> Callable[[str], int] | None:
    """Token counter of a Hugging Face tokenizer (local path or hub name), or None."""
    if tokenizer is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="input .jsonl files or plain-text dumps")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="shard format")
    parser.add_argument("--records-per-shard", type=int, default=10000, help="records per output shard")
    parser.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                        help="auto: .jsonl files are JSONL, anything else plain text")
    parser.add_argument("--text-split", choices=("lines", "blank"), default="lines",
                        help="plain text: one paragraph per line, or per blank-line-separated block")
    parser.add_argument("--on-bad-line", choices=("error", "skip"), default="error", help="malformed JSONL lines")
    parser.add_argument("--min-chars", type=int, default=0, help="drop paragraphs shorter than this (characters)")
    parser.add_argument("--max-chars", type=int, default=0, help="drop paragraphs longer than this (0 = no limit)")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer for --min-tokens/--max-tokens")
    parser.add_argument("--min-tokens", type=int, default=0,
                        help="drop paragraphs with fewer tokens (needs --tokenizer)")
    parser.add_argument("--max-tokens", type=int, default=0, help="drop paragraphs with more tokens (0 = no limit)")
    parser.add_argument("--sample", type=int, default=0, help="keep a deterministic sample of this many (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do the conversion; return the manifest (also written to ``<out>/manifest.json``)."""
    if args.records_per_shard < 1:
        raise UserError(f"--records-per-shard={args.records_per_shard}: expected >= 1")
    if (args.min_tokens or args.max_tokens) and not args.tokenizer:
        raise UserError("--min-tokens/--max-tokens need --tokenizer")
    count_tokens = make_token_counter(args.tokenizer)
    counts = {"read": 0, "bad": 0, "duplicate": 0, "too_short": 0, "too_long": 0}
    seen: set[bytes] = set()
    kept: list[Paragraph] = []
    inputs = []
    for path in args.inputs:
        if not path.is_file():
            raise UserError(f"{path}: input file does not exist")
        inputs.append({"path": str(path), "sha256": sha256_file(path)})
        is_jsonl = args.input_format == "jsonl" or (args.input_format == "auto" and path.suffix == ".jsonl")
        stream = read_jsonl_dump(path, args.on_bad_line, counts) if is_jsonl else read_text_dump(path, args.text_split)
        for p in stream:
            counts["read"] += 1
            digest = hashlib.sha256(p.text.strip().encode("utf-8")).digest()
            if digest in seen:
                counts["duplicate"] += 1
                continue
            seen.add(digest)
            n_tok = count_tokens(p.text) if count_tokens else None
            if len(p.text) < args.min_chars or (n_tok is not None and n_tok < args.min_tokens):
                counts["too_short"] += 1
                continue
            if (args.max_chars and len(p.text) > args.max_chars) or (args.max_tokens and n_tok > args.max_tokens):
                counts["too_long"] += 1
                continue
            kept.append(p)
    counts["kept"] = len(kept)
    if args.sample:
        kept = select_sample(kept, args.sample, args.seed)
    manifest = {
        "format": args.format,
        "records": len(kept),
        "inputs": inputs,
        "filters": {k: getattr(args, k) for k in
                    ("min_chars", "max_chars", "tokenizer", "min_tokens", "max_tokens", "sample", "seed")},
        "counts": counts,
        "shards": write_shards(kept, args.out, args.format, args.records_per_shard),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = run(args)
    except UserError as exc:
        print(f"prepare_corpus: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['records']} paragraphs in {len(manifest['shards'])} shard(s) to {args.out}; "
          f"counts: {manifest['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
