"""Corpus shards on disk: find them, load one whole, validate one record into a ``Paragraph``.

JSONL (one ``{id, title, text}`` object per line) and Parquet (a ``text`` column, optional ``id``/``title``).
Every error names the file and line (or row), so a bad corpus line is found without a debugger.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from megatron_pz.errors import ConfigError, DataError

SHARD_SUFFIXES = (".jsonl", ".parquet")
SAMPLE_SPLITS = ("train", "valid")


@dataclass(frozen=True)
class Paragraph:
    """One corpus record. ``id`` is unique in the corpus (``"<file>:<line>"`` when the record has none)."""

    id: str
    title: str
    text: str


def sample_corpus_path(split: str = "train") -> Path:
    """Directory of the shipped Wikipedia sample for ``split`` ("train" or "valid"), found via the package."""
    if split not in SAMPLE_SPLITS:
        raise ConfigError(f"sample corpus split={split!r}: expected one of {SAMPLE_SPLITS}")
    path = Path(str(resources.files("megatron_pz") / "assets" / "wiki_sample" / split))
    if not path.is_dir():
        raise DataError(f"shipped sample corpus not found at {path} (package installed without its assets?)")
    return path


def estimate_tokens(text: str) -> int:
    """Tokenizer-free over-estimate of the token count: UTF-8 bytes / 3 (English BPE averages ~4 bytes/token)."""
    return len(text.encode("utf-8")) // 3 + 1


def resolve_shards(paths: list[str]) -> list[Path]:
    """Expand files / directories / globs into a sorted, de-duplicated list of shard files."""
    found: set[Path] = set()
    for entry in paths:
        if os.path.isdir(entry):
            matches = [p for p in Path(entry).iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file()]
        elif any(ch in entry for ch in "*?["):
            matches = [Path(p) for p in glob.glob(entry) if Path(p).suffix in SHARD_SUFFIXES]
        elif os.path.isfile(entry):
            if Path(entry).suffix not in SHARD_SUFFIXES:
                raise DataError(f"{entry}: unsupported corpus file type (expected {', '.join(SHARD_SUFFIXES)})")
            matches = [Path(entry)]
        else:
            raise DataError(f"{entry}: corpus path does not exist")
        if not matches:
            raise DataError(f"{entry}: no {'/'.join(SHARD_SUFFIXES)} shard found")
        found.update(matches)
    return sorted(found, key=lambda p: str(p))


def load_shard(path: Path) -> list[tuple[int, Any]]:
    """Raw records of one shard as ``(line_or_row_number, raw)``; raw is a JSONL line or a Parquet row dict.

    Line numbers are 1-based; blank JSONL lines are not records. Parsing happens later, per rank; a line that is
    not valid UTF-8 is kept as bytes so that ``parse_record`` reports it with its line number.
    """
    if path.suffix == ".jsonl":
        records: list[tuple[int, Any]] = []
        with open(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        records.append((i, raw.decode("utf-8")))
                    except UnicodeDecodeError:
                        records.append((i, raw))
        return records
    import pyarrow.parquet as pq  # lazy: only Parquet users need pyarrow at import time

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({exc})") from exc
    if "text" not in table.column_names:
        raise DataError(f"{path}: Parquet file has no 'text' column (columns: {table.column_names})")
    return list(enumerate(table.to_pylist(), start=1))


def parse_record(path: Path, number: int, raw: Any) -> Paragraph:
    """Validate one raw record into a Paragraph; raises DataError naming ``path:number`` if malformed."""
    where = f"{path}:{number}"
    if isinstance(raw, bytes):
        raise DataError(f"{where}: not valid UTF-8")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: missing or empty 'text'")
    pid = raw.get("id")
    title = raw.get("title")
    return Paragraph(
        id=str(pid) if pid not in (None, "") else f"{path.name}:{number}",
        title=str(title) if title is not None else "",
        text=text,
    )
