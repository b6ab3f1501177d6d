"""Rebuild ``pz_wiki_lastword.jsonl`` from the team's WikiText-103 test copy (see README.md in this folder).

    python megatron_pz/assets/harness/make_task.py /work/shared/data

Deterministic. A paragraph qualifies when it ends with a plain word of 3+ letters followed by a full stop; its
context is the longest run of whole sentences before that word that fits ``MAX_CONTEXT_CHARS``, and the target is
the word with its leading space (LAMBADA's layout). ``ROWS`` paragraphs are drawn with ``random.Random(0)`` and
kept in source order.
"""
import hashlib
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "pz_wiki_lastword.jsonl"
SOURCE = "wiki/wikitext103_test.jsonl"
ROWS = 100
MAX_CONTEXT_CHARS = 320
LAST_WORD = re.compile(r"^(?P<context>.*\S) (?P<word>[A-Za-z][a-z]{2,})\.$", re.S)


def item(record: dict) -> dict | None:
    m = LAST_WORD.match(record["text"].strip())
    if m is None:
        return None
    context = m["context"]
    # Start at a sentence boundary (". " then a capital letter) so the context reads as whole sentences.
    starts = [0] + [b.end() for b in re.finditer(r"[.!?] (?=[A-Z])", context)]
    start = next((s for s in starts if len(context) - s <= MAX_CONTEXT_CHARS), None)
    if start is None:
        return None
    return {"id": record["id"], "context": context[start:], "target": " " + m["word"]}


def main(root: str) -> None:
    src = Path(root) / SOURCE
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [it for it in map(item, rows) if it is not None]
    chosen = [items[i] for i in sorted(random.Random(0).sample(range(len(items)), ROWS))]
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    print(f"{OUT.name}: {len(chosen)} of {len(items)} qualifying paragraphs ({len(rows)} read) from {SOURCE}, "
          f"sha256 {hashlib.sha256(src.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
