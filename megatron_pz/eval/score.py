"""Pure scoring functions: per-response correctness by suite kind, and mean@k / unbiased pass@k aggregation.

Kinds:
* ``span``: the training reward itself (``rewards.span``): exact match of the last ``\\boxed{}`` against the
  hidden span, strict (surrounding whitespace only) and lenient (casefold, collapsed whitespace, trailing
  punctuation dropped).
* ``math``: ``extract.extract_answer`` (the last ``\\boxed{}``, else "The answer is", else ``####``), compared with
  the gold answer by Math-Verify, or by the light checker ``extract.math_equal`` where Math-Verify is not
  installed (``answers.check_answer``; ``Score.checker`` says which).
* ``choice``: ``extract.extract_choice`` letter == the gold letter.

mean@k is the mean correctness over all k samples of all items (for k = 1 greedy this is plain accuracy);
pass@k is the unbiased estimator of Chen et al. 2021 (Codex paper): per item with n samples of which c are
correct, ``1 - C(n-c, k) / C(n, k)``, averaged over items.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_pz.data.parsers import extract_boxed
from megatron_pz.eval.answers import check_answer
from megatron_pz.eval.extract import extract_answer, extract_choice
from megatron_pz.rewards.span import continuation_answer, normalize_lenient, normalize_strict

KINDS = ("span", "math", "choice")


@dataclass(frozen=True)
class Score:
    """Outcome of one response: the extracted answer (None = none found), strict and lenient correctness, and for
    maths the checker that decided ("math-verify 0.9.0" or "light checker")."""

    extracted: str | None
    correct: bool
    lenient: bool
    checker: str | None = None


def score_span(response: str, target: str, restate: bool = False) -> Score:
    """The last ``\\boxed{}``; after a restated prompt (``prompt.pred_restate``) the continuation's first words
    (``rewards.span.continuation_answer``), so strict accuracy is the training reward ``continuation_match``."""
    if restate:
        answer = continuation_answer(response, target)
    else:
        answer = extract_boxed(response) if isinstance(response, str) else None
    if answer is None:
        return Score(None, False, False)
    return Score(answer, normalize_strict(answer) == normalize_strict(target),
                 normalize_lenient(answer) == normalize_lenient(target))


def score_math(response: str, target: str, checker: str = "auto") -> Score:
    """``checker``: "auto" (Math-Verify when installed, else the light checker), "math-verify" or "light"."""
    answer = extract_answer(response)
    ok, label = check_answer(answer, target, checker)
    return Score(answer, ok, ok, label)


def score_choice(response: str, target: str, num_options: int = 10) -> Score:
    letter = extract_choice(response, num_options)
    ok = letter is not None and letter == target.strip().upper()
    return Score(letter, ok, ok)


def score_response(kind: str, response: str, target: str, metadata: dict | None = None,
                   restate: bool = False, checker: str = "auto") -> Score:
    """Dispatch on the suite kind (``span`` | ``math`` | ``choice``); ``restate`` applies to span suites,
    ``checker`` to maths suites (``score_math``)."""
    if kind == "span":
        return score_span(response, target, restate)
    if kind == "math":
        return score_math(response, target, checker)
    if kind == "choice":
        return score_choice(response, target, int((metadata or {}).get("num_options", 10)))
    raise ValueError(f"unknown suite kind {kind!r}; expected one of {KINDS}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one item: n samples, c correct [Chen et al. 2021]: ``1 - C(n-c,k)/C(n,k)``.

    Computed as a running product, exact for any n (no factorial overflow).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean correctness over every sample of every item (each item weighted equally); 0 for no items."""
    items = [row for row in correct if len(row)]
    if not items:
        return 0.0
    return sum(sum(map(bool, row)) / len(row) for row in items) / len(items)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over items (each item needs >= k samples)."""
    items = [row for row in correct if len(row)]
    if not items:
        return 0.0
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in items) / len(items)
