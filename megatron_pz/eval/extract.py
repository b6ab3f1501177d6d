"""Answer extraction and a light answer checker for the evaluation suites.

``extract_answer`` finds the final answer of every maths response, whichever checker compares it. The light checker
(``normalize_math``, ``math_equal``) is the *fallback* comparison, used only where Math-Verify cannot be imported
(``answers.check_answer``): it is dependency-free, linear-time and crash-proof on any model output, but it is
not Math-Verify nor the Qwen2.5-Math evaluation's ``math_equal`` (which use sympy / LaTeX parsing to prove
symbolic equality): expressions that are equal only symbolically (``\\sqrt{8}`` vs ``2\\sqrt{2}``, reordered
polynomials or lists) are scored wrong here, and a few near misses right (``2x`` for ``2``: the letter reads as a
unit; ``70001`` for ``70000``: within the relative tolerance). Figures from it are comparable only with themselves
(docs/eval.md tabulates where the two checkers disagree).

What it does:

* ``extract_answer``: the content of the last balanced ``\\boxed{}`` (``data.parsers.extract_boxed``, linear time,
  nested braces fine); otherwise the text after the last "The answer is"/"Final answer:"; otherwise after the last
  ``#### `` (GSM8K's own format). ``None`` when none is present (no "last number" guess: an unboxed answer
  counts as wrong, as in the Qwen2.5-Math CoT protocol for the boxed prompt).
* ``normalize_math``: strips ``$``, ``\\left``/``\\right``, spacing commands, ``\\text{...}``/``\\mathrm{...}``
  wrappers (keeps their content), a trailing unit word after a number, ``^\\circ``, ``\\%``/``%``, a leading
  ``x =``, thousands separators (``1,000``), trailing ``.0``/``.00``, turns ``\\dfrac``/``\\tfrac`` into ``\\frac``.
* ``parse_number``: integers, decimals, ``a/b``, ``\\frac{a}{b}``, ``\\frac ab``, mixed signs; ``None`` otherwise.
* ``math_equal``: normalised strings equal, or both numbers equal within a relative tolerance (1e-4), or both
  tuples/intervals/lists with element-wise equal entries. A percentage also matches its fraction (``50\\%`` =
  ``0.5``).
* ``extract_choice``: a multiple-choice letter (A–J, limited to the options offered) from ``\\boxed{B}``,
  ``\\boxed{(B)}``, ``\\boxed{\\text{B}}``, ``\\boxed{B. text}``, or the text after "answer is"/"Answer:".
"""
from __future__ import annotations

import math
import re

from megatron_pz.data.parsers import extract_boxed

LETTERS = "ABCDEFGHIJ"
_TAIL = 300  # characters kept after an "answer is" marker

# Markers searched (case-insensitively) from the end of the output; the text after the last one is the answer.
_ANSWER_MARKERS = ("the final answer is", "final answer:", "the correct answer is", "the answer is", "answer:")


def _after_last_marker(text: str, markers: tuple[str, ...]) -> str | None:
    low = text.lower()
    best, best_end = -1, -1
    for m in markers:
        pos = low.rfind(m)
        if pos > best:
            best, best_end = pos, pos + len(m)
    if best < 0:
        return None
    tail = text[best_end: best_end + _TAIL].lstrip(" \t:")
    # The answer runs to the end of the line / sentence (the next line when the marker ends its line).
    line = next((ln.strip() for ln in tail.split("\n") if ln.strip()), "")
    line = re.sub(r"\.\s.*$", "", line)  # first sentence only (". " then more text)
    return line.strip().rstrip(".").strip() or None


def extract_answer(text: str | None) -> str | None:
    """Final answer of a math response: last ``\\boxed{}``, else after "The answer is", else after ``####``."""
    if not isinstance(text, str) or not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    found = _after_last_marker(text, _ANSWER_MARKERS)
    if found is not None:
        inner = extract_boxed(found)
        return inner if inner is not None else found
    pos = text.rfind("####")
    if pos >= 0:
        line = text[pos + 4: pos + 4 + _TAIL].strip().split("\n", 1)[0].strip()
        return line or None
    return None


# ------------------------------------------------------------------ normalisation
# Each pattern is a bounded/atomic-free construct applied once; inputs are capped at _MAX_NORM characters, so
# normalising is linear in practice even on adversarial text.
_MAX_NORM = 2000
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d])")
_TRAILING_ZERO = re.compile(r"(\d)\.0+(?!\d)")
_UNIT_AFTER_NUMBER = re.compile(r"^(-?[\d.,/]+)\s*(?:[a-zA-Z][a-zA-Z ]{0,30})$")
_LHS = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF = re.compile(r"\\frac\{([^{}]*)\}(\d)")


def normalize_math(answer: str | None) -> str:
    """Canonical string form of a math answer (see module docstring); "" for None."""
    if answer is None:
        return ""
    s = str(answer)[:_MAX_NORM].strip()
    s = s.replace("\n", " ").replace("\\!", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\displaystyle", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    percent = "\\%" in s or s.endswith("%")
    s = s.replace("\\%", "").replace("%", "")
    for _ in range(3):  # nested \text{\textbf{...}}
        s = _TEXT_CMD.sub(r"\1", s)
    s = _SPACING.sub(" ", s)
    s = _LHS.sub("", s.strip())
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF.sub(r"\\frac{\1}{\2}", s)
    s = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), s)
    s = s.strip().rstrip(".").strip()
    m = _UNIT_AFTER_NUMBER.match(s)
    if m and parse_number(m.group(1)) is not None:
        s = m.group(1)
    s = _TRAILING_ZERO.sub(r"\1", s)
    s = " ".join(s.split())
    s = s.replace(" ", "") if len(s) < 200 else s
    return s + ("%" if percent else "")


_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_FRAC = re.compile(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_SLASH = re.compile(r"^([+-]?[\d.]+)/([+-]?[\d.]+)$")


def parse_number(s: str | None) -> float | None:
    """A float for plain numbers, ``a/b`` and ``\\frac{a}{b}`` (after light clean-up), else None."""
    if s is None:
        return None
    t = str(s).strip().replace(" ", "").replace("{,}", "")
    if len(t) > 100 or not t:
        return None
    t = t.rstrip("%")
    if _NUMBER.match(t):
        try:
            v = float(t)
        except (ValueError, OverflowError):
            return None
        return v if math.isfinite(v) else None
    m = _FRAC.match(t)
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        return (-1 if m.group(1) == "-" else 1) * num / den
    m = _SLASH.match(t)
    if m:
        num, den = parse_number(m.group(1)), parse_number(m.group(2))
        if num is None or den is None or den == 0:
            return None
        return num / den
    return None


def numbers_close(a: float, b: float, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def _split_top_level(s: str) -> list[str] | None:
    """Split ``(a, b)``/``[a, b)``/``a, b`` at top-level commas; None when there is no top-level comma."""
    depth, parts, cur = 0, [], []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts if len(parts) > 1 else None


def _scalar_equal(p: str, g: str, rel_tol: float) -> bool:
    if p == g:
        return True
    pv, gv = parse_number(p), parse_number(g)
    if pv is None or gv is None:
        return False
    if numbers_close(pv, gv, rel_tol):
        return True
    # A percentage may be given as a fraction on the other side: 50% vs 0.5.
    if p.endswith("%") != g.endswith("%"):
        return numbers_close(pv / 100 if p.endswith("%") else pv, gv / 100 if g.endswith("%") else gv, rel_tol)
    return False


def math_equal(pred: str | None, gold: str | None, rel_tol: float = 1e-4) -> bool:
    """True if ``pred`` and ``gold`` are the same answer under the light rules (see module docstring)."""
    if pred is None or gold is None:
        return False
    p, g = normalize_math(pred), normalize_math(gold)
    if not p or not g:
        return False
    if _scalar_equal(p, g, rel_tol):
        return True
    # Tuples / intervals / lists: same brackets (or none), element-wise equal.
    brackets = "([{"
    p_open, g_open = (p[0] if p[0] in brackets else ""), (g[0] if g[0] in brackets else "")
    p_body = p[1:-1] if p_open and len(p) >= 2 else p
    g_body = g[1:-1] if g_open and len(g) >= 2 else g
    if (p_open and g_open and (p[0], p[-1]) != (g[0], g[-1])) or len(p_body) > _MAX_NORM:
        return False
    ps, gs = _split_top_level(p_body), _split_top_level(g_body)
    if ps is None or gs is None or len(ps) != len(gs):
        return False
    return all(_scalar_equal(a.strip(), b.strip(), rel_tol) for a, b in zip(ps, gs))


# ------------------------------------------------------------------ multiple choice
_CHOICE_IN_BOX = re.compile(r"^\(?\s*([A-J])\s*\)?(?:$|[.:)\s])")
_CHOICE_IN_TEXT = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])")


def _letter_of(candidate: str, valid: str) -> str | None:
    c = candidate.strip()[:_TAIL]
    for _ in range(3):
        c = _TEXT_CMD.sub(r"\1", c)
    c = c.replace("$", "").replace("*", "").strip()
    m = _CHOICE_IN_BOX.match(c)
    if m and m.group(1) in valid:
        return m.group(1)
    return None


def extract_choice(text: str | None, num_options: int = 10) -> str | None:
    """The chosen letter (A.. up to ``num_options``) of a multiple-choice response, or None.

    Order: the last ``\\boxed{}`` (its content must start with the letter: ``B``, ``(B)``, ``B. text``,
    ``\\text{B}``); otherwise the first letter standing alone right after the last "answer is"/"Answer:".
    """
    if not isinstance(text, str) or not text:
        return None
    valid = LETTERS[: max(1, min(num_options, len(LETTERS)))]
    boxed = extract_boxed(text)
    if boxed is not None:
        return _letter_of(boxed, valid)
    found = _after_last_marker(text, _ANSWER_MARKERS)
    if found is None:
        return None
    inner = extract_boxed(found)
    if inner is not None:
        return _letter_of(inner, valid)
    letter = _letter_of(found, valid)
    if letter is not None:
        return letter
    cleaned = found.replace("$", "").replace("*", "")[:40]
    m = _CHOICE_IN_TEXT.search(cleaned)
    return m.group(1) if m and m.group(1) in valid else None
