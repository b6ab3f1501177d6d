"""Where Math-Verify and the light checker disagree, on the shipped maths samples (docs/eval.md reproduces the table).

For every item of the maths suites' shipped samples (gsm8k, math500, olympiadbench; ``--data SUITE=PATH`` for
others) the gold answer is paired with candidate answers made from it by rule:

* equivalent rewritings (should be scored correct): the gold itself, thousands separators, ``.0``, ``a/b`` and
  ``\\dfrac`` for ``\\frac{a}{b}``, exact decimals for fractions and fractions for decimals, ``\\sqrt{k^2 m}`` for
  ``k\\sqrt{m}``, a mixed number as a fraction, ``x = `` prefixed to a number, ``\\text{}``/units/``^\\circ``/``\\$``
  dropped, spaces and ``\\left``/``\\right`` dropped, unordered lists reversed, and the gold as sympy prints it
  after Math-Verify parsed it;
* near misses (should be scored wrong): the last integer in the gold plus one, the sign flipped, a variable
  appended to a number (``2x`` for ``2``), a fraction inverted, ``\\sqrt{m+1}``, a pair's brackets flipped
  (``[a,b]`` for ``(a,b)``) or its entries swapped, a list with its last element dropped;
* a convention case (no right answer): a non-terminating fraction rounded to 4 decimals.

Each candidate is put in a response (``... the final answer is $\\boxed{<candidate>}$.``) and scored by both
checkers through ``score.score_math``. The output is a Markdown table per suite and category (counts of
candidates, of those each checker accepts, of disagreements) and examples of every kind of disagreement.

    python tools/checker_disagreement.py                 # the shipped samples, ~1-3 min on one CPU core
    python tools/checker_disagreement.py --examples 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_pz.eval.answers import checker_label  # noqa: E402
from megatron_pz.eval.score import score_math  # noqa: E402
from megatron_pz.eval.suites import load_suite  # noqa: E402

MATH_SAMPLES = ("gsm8k", "math500", "olympiadbench")
EQUIV, MISS, CONVENTION = "equivalent", "near miss", "convention"

_INT = re.compile(r"^-?\d+$")
_DEC = re.compile(r"^-?\d+\.\d+$")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$|^(-?)\\frac(\d)(\d)$|^(-?)\\frac\{(\d+)\}(\d)$")
_KSQRT = re.compile(r"^(\d*)\s*\\sqrt\{?(\d+)\}?$")
_MIXED = re.compile(r"^(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$")
_GROUPED = re.compile(r"^-?\d{1,3}(?:,\d{3})+$")
_LAST_INT = re.compile(r"\d+(?!.*\d)", re.DOTALL)
_UNIT_SUFFIX = re.compile(r"^(.*?)\s*\\(?:text|mbox)\{[^{}]*\}(?:\^\d)?$")
_INTERVAL = re.compile(r"^[(\[][^,()\[\]]+,[^,()\[\]]+[)\]]$")
_POINT = re.compile(r"^\(([^,()]+),([^,()]+)\)$")


def _fraction(gold: str) -> Fraction | None:
    m = _FRAC.match(gold.replace(" ", ""))
    if not m:
        return None
    g = [x for x in m.groups() if x is not None]
    sign, num, den = (g[0], g[1], g[2]) if len(g) == 3 else ("", g[0], g[1])
    if int(den) == 0:
        return None
    return Fraction(int(num), int(den)) * (-1 if sign == "-" else 1)


def _terminates(f: Fraction) -> bool:
    d = f.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _top_level_parts(s: str) -> list[str]:
    depth, parts, cur = 0, [], ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _sympy_reprint(gold: str) -> str | None:
    if "\\log" in gold:  # sympy prints log(x, b) as \\log{(x)}, which reads as a different base
        return None
    try:
        import sympy
        from math_verify import parse
        parsed = parse("\\boxed{" + gold + "}")
        if parsed and isinstance(parsed[0], (sympy.Basic, sympy.MatrixBase)):
            return sympy.latex(parsed[0])
    except Exception:  # noqa: BLE001 - a gold Math-Verify cannot parse simply gets no re-print
        return None
    return None


def candidates(gold: str) -> list[tuple[str, str, str]]:
    """(category, kind, candidate) for one gold answer; kind is EQUIV, MISS or CONVENTION."""
    g = gold.strip()
    out: list[tuple[str, str, str]] = [("gold itself", EQUIV, g)]

    def add(cat: str, kind: str, cand: str | None) -> None:
        if cand is not None and cand.strip() and all(cand != c for _, _, c in out):
            out.append((cat, kind, cand))

    plain = g.replace("\\!", "").replace(" ", "")
    grouped = _GROUPED.match(plain) is not None  # "11,\! 111,\! 100": one number with thousands separators
    if grouped:
        add("thousands separators dropped", EQUIV, plain.replace(",", ""))
    if _INT.match(g):
        n = int(g)
        if abs(n) >= 1000:
            add("thousands separators", EQUIV, f"{n:,}")
        add("trailing .0", EQUIV, f"{n}.0")
        add("fraction n/1 form", EQUIV, f"\\frac{{{2 * n}}}{{2}}")
        add("x = prefix", EQUIV, f"x = {n}")
        add("unit words", EQUIV, f"{n} dollars")
        add("last integer + 1", MISS, str(n + 1))
        if n:
            add("sign flipped", MISS, str(-n))
        if n:  # 0x is 0
            add("variable appended", MISS, f"{n}x")
    f = _fraction(g)
    if f is not None:
        sign = "-" if f < 0 else ""
        add("a/b for \\frac", EQUIV, f"{sign}{abs(f.numerator)}/{f.denominator}")
        add("\\dfrac for \\frac", EQUIV, f"{sign}\\dfrac{{{abs(f.numerator)}}}{{{f.denominator}}}")
        if _terminates(f):
            add("exact decimal", EQUIV, str(float(f)))
        else:
            add("rounded to 4 decimals", CONVENTION, f"{float(f):.4f}")
        if f.numerator != f.denominator:
            add("fraction inverted", MISS, f"{sign}\\frac{{{f.denominator}}}{{{abs(f.numerator)}}}")
    if _DEC.match(g):
        fr = Fraction(g)
        add("fraction for decimal", EQUIV, f"\\frac{{{fr.numerator}}}{{{fr.denominator}}}")
    m = _KSQRT.match(g)
    if m:
        k, r = int(m.group(1) or 1), int(m.group(2))
        add("\\sqrt{k^2 m} for k\\sqrt{m}", EQUIV, f"\\sqrt{{{k * k * r}}}")
        add("\\sqrt{m+1}", MISS, f"{m.group(1)}\\sqrt{{{r + 1}}}")
    m = _MIXED.match(g)
    if m:
        w, a, b = (int(x) for x in m.groups())
        add("mixed number as a fraction", EQUIV, f"\\frac{{{w * b + a}}}{{{b}}}")
    m = _UNIT_SUFFIX.match(g)
    if m and m.group(1):
        add("unit text dropped", EQUIV, m.group(1))
    if g.startswith("\\text{") and g.endswith("}") and g.count("{") == 1:
        add("\\text{} unwrapped", EQUIV, g[len("\\text{"):-1])
    for deg in ("^\\circ", "^{\\circ}"):
        if g.endswith(deg):
            add("^\\circ dropped", EQUIV, g[: -len(deg)].strip())
    if g.startswith("\\$"):
        add("\\$ dropped", EQUIV, g[2:])
    if re.match(r"^[a-zA-Z]\s*=\s*-?\d+$", g):
        add("x = dropped", EQUIV, g.split("=", 1)[1].strip())
    # Spaces between two letters stay (``\\cot x``); a mixed number ``137 \\frac{1}{2}`` would become a product.
    spaced = re.sub(r"(?<![A-Za-z]) | (?![A-Za-z])", "", g.replace("\\left", "").replace("\\right", ""))
    if not _MIXED.match(g):
        add("spaces, \\left/\\right dropped", EQUIV, spaced)
    parts = _top_level_parts(g)
    if len(parts) > 1 and not grouped:  # a list of answers ("1,3", "(6,3),(9,3)"): unordered, the convention of both benchmarks
        clean = [p.strip().strip("$").strip() for p in parts]
        add("unordered list reversed", EQUIV, ",".join(reversed(clean)))
        add("last element dropped", MISS, ",".join(clean[:-1]))
    if _INTERVAL.match(spaced):
        flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
        if "\\infty" not in spaced:
            add("brackets flipped", MISS, flip[spaced[0]] + spaced[1:-1] + flip[spaced[-1]])
    m = _POINT.match(spaced)
    if m and m.group(1) != m.group(2):
        add("(a,b) swapped to (b,a)", MISS, f"({m.group(2)},{m.group(1)})")
    unit = _UNIT_SUFFIX.match(g)
    core = unit.group(1) if unit and unit.group(1) else g  # "15\\mbox{ cm}^2": change the 15, not the unit
    if not _INT.match(g) and _LAST_INT.search(core):
        add("last integer + 1", MISS, _LAST_INT.sub(lambda x: str(int(x.group()) + 1), core, count=1) + g[len(core):])
    if not _INT.match(g) and "=" not in g and "," not in g and "\\text" not in g:
        add("sign flipped", MISS, f"-\\left({g}\\right)")
    add("sympy re-print", EQUIV, _sympy_reprint(g))
    return out


def response(candidate: str) -> str:
    return f"Putting it together, the final answer is $\\boxed{{{candidate}}}$."


def run(suites: dict[str, str | None], limit: int | None = None) -> list[dict]:
    rows = []
    for suite, path in suites.items():
        for item in load_suite(suite, path, limit):
            for cat, kind, cand in candidates(item.target):
                resp = response(cand)
                light = score_math(resp, item.target, "light").correct
                mv = score_math(resp, item.target, "math-verify").correct
                rows.append({"suite": suite, "id": item.id, "gold": item.target, "category": cat, "kind": kind,
                             "candidate": cand, "light": light, "math_verify": mv})
    return rows


def tables(rows: list[dict], examples: int = 2) -> str:
    counts: dict[tuple, Counter] = defaultdict(Counter)
    for r in rows:
        key = (r["kind"], r["category"])
        c = counts[key]
        c["n"] += 1
        c["light"] += r["light"]
        c["mv"] += r["math_verify"]
        c["only_mv"] += r["math_verify"] and not r["light"]
        c["only_light"] += r["light"] and not r["math_verify"]
    order = {EQUIV: 0, MISS: 1, CONVENTION: 2}
    lines = ["| candidate | should be | n | light accepts | Math-Verify accepts | only Math-Verify | only light |",
             "|---|---|---:|---:|---:|---:|---:|"]
    should_be = {EQUIV: "correct", MISS: "wrong", CONVENTION: "either"}

    def row(name: str, should: str, c: Counter) -> str:
        return f"| {name} | {should} | {c['n']} | {c['light']} | {c['mv']} | {c['only_mv']} | {c['only_light']} |"

    per_kind: dict[str, Counter] = defaultdict(Counter)
    for (kind, cat), c in sorted(counts.items(), key=lambda kv: (order[kv[0][0]], -kv[1]["n"], kv[0][1])):
        lines.append(row(cat, should_be[kind], c))
        per_kind[kind].update(c)
    totals = {EQUIV: "**all equivalent rewritings**", MISS: "**all near misses**", CONVENTION: "**all convention cases**"}
    for kind in sorted(per_kind, key=order.get):
        lines.append(row(totals[kind], should_be[kind], per_kind[kind]))
    by_suite = Counter((r["suite"], r["light"] != r["math_verify"]) for r in rows)
    suites = sorted({r["suite"] for r in rows})
    lines += ["", "Disagreements per suite: " + ", ".join(
        f"{s} {by_suite[(s, True)]} of {by_suite[(s, True)] + by_suite[(s, False)]}" for s in suites), ""]
    if examples:
        lines += ["| suite | gold | candidate | should be | light | Math-Verify |", "|---|---|---|---|---|---|"]
        shown: Counter = Counter()
        for r in rows:
            if r["light"] == r["math_verify"]:
                continue
            key = (r["category"], r["math_verify"])
            if shown[key] >= examples:
                continue
            shown[key] += 1
            lines.append(f"| {r['suite']} | `{r['gold']}` | `{r['candidate']}` ({r['category']}) | "
                         f"{should_be[r['kind']]} | "
                         f"{'✓' if r['light'] else '✗'} | {'✓' if r['math_verify'] else '✗'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default=",".join(MATH_SAMPLES), help="comma-separated maths suites")
    p.add_argument("--data", action="append", default=[], metavar="SUITE=PATH", help="data other than the sample")
    p.add_argument("--limit", type=int, default=None, help="items per suite (default all)")
    p.add_argument("--examples", type=int, default=2, help="examples per kind of disagreement (0: none)")
    p.add_argument("--json", default=None, help="also write every scored candidate to this file")
    args = p.parse_args(argv)
    data = dict(d.split("=", 1) for d in args.data)
    suites = {s: data.get(s) for s in args.suite.split(",") if s}
    label = checker_label("math-verify")  # fails loudly when Math-Verify cannot run: nothing to compare
    rows = run(suites, args.limit)
    print(f"Checkers: {label} vs light checker; {len(rows)} candidates over "
          f"{len({(r['suite'], r['id']) for r in rows})} items ({', '.join(suites)}).\n")
    print(tables(rows, args.examples))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
