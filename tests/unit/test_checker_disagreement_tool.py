"""tools/checker_disagreement.py: the candidates it makes from a gold answer, and its table on a few items."""
import sys
from pathlib import Path

import pytest

from megatron_pz.eval.answers import math_verify_version

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from checker_disagreement import CONVENTION, EQUIV, MISS, candidates, run, tables  # noqa: E402


def test_candidates_by_hand():
    got = {(cat, kind): cand for cat, kind, cand in candidates("3\\sqrt{13}")}
    assert got[("gold itself", EQUIV)] == "3\\sqrt{13}"
    assert got[("\\sqrt{k^2 m} for k\\sqrt{m}", EQUIV)] == "\\sqrt{117}"
    assert got[("\\sqrt{m+1}", MISS)] == "3\\sqrt{14}"
    got = {(cat, kind): cand for cat, kind, cand in candidates("-\\frac{35}{9}")}
    assert got[("a/b for \\frac", EQUIV)] == "-35/9" and got[("fraction inverted", MISS)] == "-\\frac{9}{35}"
    assert got[("rounded to 4 decimals", CONVENTION)] == "-3.8889"
    got = {(cat, kind): cand for cat, kind, cand in candidates("18000")}
    assert got[("thousands separators", EQUIV)] == "18,000" and got[("variable appended", MISS)] == "18000x"
    assert ("variable appended", MISS) not in {(c, k) for c, k, _ in candidates("0")}  # 0x is 0
    got = {(cat, kind): cand for cat, kind, cand in candidates("(6,3),(9,3)")}
    assert got[("unordered list reversed", EQUIV)] == "(9,3),(6,3)" and got[("last element dropped", MISS)] == "(6,3)"
    # the unit is not the number: the near miss changes the 15
    assert dict(((c, k), v) for c, k, v in candidates("15\\mbox{ cm}^2"))[("last integer + 1", MISS)] == \
        "16\\mbox{ cm}^2"


@pytest.mark.skipif(math_verify_version() is None, reason="math_verify is not installed")
def test_table_on_a_few_items():
    rows = run({"gsm8k": None}, limit=3)
    assert len({r["id"] for r in rows}) == 3
    gold = [r for r in rows if r["category"] == "gold itself"]
    assert len(gold) == 3 and all(r["light"] and r["math_verify"] for r in gold)
    appended = [r for r in rows if r["category"] == "variable appended"]  # "70000x" for 70000 (docs/eval.md)
    assert appended and all(r["light"] and not r["math_verify"] for r in appended)
    text = tables(rows)
    assert "| gold itself | correct | 3 | 3 | 3 | 0 | 0 |" in text and "gsm8k" in text
