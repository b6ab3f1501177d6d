"""Maths answers scored by Math-Verify in its worker process (eval/answers.py), the light checker as the fallback.

Every case below was checked by hand; the disagreement cases pin docs/eval.md's table
(tools/checker_disagreement.py)."""
import json
import threading
import time

import pytest

from megatron_pz.eval import answers
from megatron_pz.eval.answers import LIGHT_CHECKER, MathVerifyWorker, check_answer, checker_label, math_verify_version
from megatron_pz.eval.score import score_math

pytestmark = pytest.mark.skipif(math_verify_version() is None, reason="math_verify is not installed")
MV = f"math-verify {math_verify_version()}"


def boxed(answer: str) -> str:
    return f"Reasoning... so the final answer is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize("response, gold", [
    (boxed("2\\sqrt{2}"), "\\sqrt{8}"),                     # symbolic: the light checker misses it
    (boxed("\\sqrt{8}"), "2\\sqrt{2}"),
    (boxed("0.5"), "\\frac{1}{2}"),
    (boxed("\\frac{1}{2}"), "0.5"),
    (boxed("\\dfrac12"), "\\frac{1}{2}"),
    (boxed("1/2"), "\\frac{1}{2}"),
    (boxed("(1, 2]"), "(1,2]"),                             # intervals
    (boxed("(-\\infty,2)\\cup(3,\\infty)"), "(-\\infty, 2) \\cup (3, \\infty)"),
    (boxed("\\{2, 1\\}"), "\\{1,2\\}"),                     # sets, any order
    (boxed("5, 3"), "3, 5"),
    (boxed("(54,5),(6,3)"), "(6,3),(54,5)"),                # OlympiadBench lists of solutions
    (boxed("18,000"), "18000"),                             # GSM8K numbers with commas, units, dollars
    (boxed("\\$18,000"), "18000"),
    (boxed("18,000 dollars"), "18000"),
    (boxed("18000.00"), "18000"),
    (boxed("x = 5"), "5"),                                  # equations
    (boxed("5"), "x=5"),
    (boxed("90"), "90^\\circ"),
    (boxed("(x+1)^2"), "x^2+2x+1"),
    (boxed("\\left( 3, \\frac{\\pi}{2} \\right)"), "(3, \\pi/2)"),
    (boxed("\\begin{pmatrix}-1/3\\\\2/3\\end{pmatrix}"), "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}"),
    (boxed("\\frac{275}{2}"), "137 \\frac{1}{2}"),         # a mixed number
    (boxed("\\text{(C)}"), "\\text{(C)}"),
    ("So the answer is 42.", "42"),                         # marked without a box: still an answer
    ("Adding up:\n#### 1,234", "1234"),                     # GSM8K's own marker
])
def test_math_verify_accepts(response, gold):
    s = score_math(response, gold, "math-verify")
    assert s.correct and s.lenient and s.checker == MV, s


@pytest.mark.parametrize("response, gold", [
    (boxed("[1,2)"), "(1,2]"),
    (boxed("[-1,6]"), "(-1,6)"),
    (boxed("\\{1,3\\}"), "\\{1,2\\}"),
    (boxed("2\\sqrt{3}"), "2\\sqrt{2}"),
    (boxed("70001"), "70000"),
    (boxed("2x"), "2"),
    (boxed("-\\frac{1}{2}"), "\\frac{1}{2}"),
    (boxed("0.3333"), "\\frac{1}{3}"),
    ("We find that x = 42 in the end.", "42"),            # neither boxed nor marked: no answer, as before
    (boxed(""), "0"),
])
def test_math_verify_rejects(response, gold):
    s = score_math(response, gold, "math-verify")
    assert not s.correct and s.checker == MV, s


def test_unboxed_answer_is_no_answer():
    s = score_math("The result is 2\\sqrt{2}, clearly.", "\\sqrt{8}", "math-verify")
    assert s.extracted is None and not s.correct


# ---------------------------------------------------------------- where the two checkers disagree (docs/eval.md)
@pytest.mark.parametrize("answer, gold, light, mv", [
    ("\\sqrt{117}", "3\\sqrt{13}", False, True),             # symbolic equality
    ("x^{5} - x^{4} + x^{3} - x^{2} + x - 1", "x^5 - x^4 + x^3 - x^2 + x - 1", False, True),
    ("1,-2", "-2,1", False, True),                           # unordered list
    ("15", "15\\mbox{ cm}^2", False, True),                  # unit text
    ("70001", "70000", True, False),                          # light: 1e-4 relative tolerance on integers
    ("2x", "2", True, False),                                 # light: a trailing letter taken for a unit
    ("0.3333", "\\frac{1}{3}", True, False),                  # rounded decimals: a convention
    ("[15,-29]", "(15,-29)", False, True),                    # Math-Verify: a pair's brackets ignored
    ("2516_9", "2516_8", False, True),                        # Math-Verify: the base subscript ignored
    ("16,3,1", "16,3,1,1", False, True),                      # Math-Verify: lists compared as sets
])
def test_pinned_disagreements(answer, gold, light, mv):
    assert score_math(boxed(answer), gold, "light").correct is light
    assert score_math(boxed(answer), gold, "math-verify").correct is mv


def test_report_label_and_light_fallback(monkeypatch):
    assert checker_label() == MV and checker_label("light") == LIGHT_CHECKER
    monkeypatch.setattr(answers, "math_verify_version", lambda: None)
    assert checker_label() == LIGHT_CHECKER
    s = score_math(boxed("2\\sqrt{2}"), "\\sqrt{8}")
    assert s.checker == LIGHT_CHECKER and not s.correct
    with pytest.raises(ValueError):
        check_answer("1", "1", "sympy")


def test_a_worker_that_cannot_import_math_verify_falls_back(monkeypatch, tmp_path):
    fake = tmp_path / "math_verify"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('broken install')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker puts the package root first, then this
    w = MathVerifyWorker()
    monkeypatch.setattr(answers, "_worker", w)
    assert not w.available() and "broken install" in w.unavailable
    assert check_answer("2\\sqrt{2}", "\\sqrt{8}") == (False, LIGHT_CHECKER)
    assert check_answer("0.5", "\\frac{1}{2}") == (True, LIGHT_CHECKER)
    with pytest.raises(RuntimeError, match="broken install"):
        check_answer("1", "1", "math-verify")


# ---------------------------------------------------------------- threads and untrusted text
def test_scoring_from_threads():
    """Math-Verify's own limits need the main thread; the worker process makes any thread fine."""
    results, errors = [], []

    def work(i):
        try:
            results.append(score_math(boxed(f"\\frac{{{2 * i}}}{{2}}"), str(i), "math-verify").correct)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == [True] * 4


NASTY = [
    "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",   # huge nested braces
    "\\boxed{" * 100_000,                                     # unterminated boxes
    "x" * 100_000 + "\\boxed{" + "9" * 100_000 + "}",          # 100k characters, a 100k-digit answer
    boxed("+".join(["\\frac{1}{2}"] * 60)),                   # a \frac chain (660 characters: parsed)
    boxed("\\frac{1}{" * 8 + "2" + "}" * 8),                  # nested \frac (within the depth cap)
    boxed("\\frac{}{}^^__\\left(\\right\\sqrt[}"),            # invalid LaTeX
    boxed("\x00 5 \x00\ud800"),                               # NUL bytes, a lone surrogate
    boxed("10^{10^{10}}"),                                     # a huge integer: Math-Verify's own timeout
    boxed("\\begin{pmatrix}" + "1&" * 300 + "1\\end{pmatrix}"),
]


def test_untrusted_output_returns_in_bounded_time_without_raising():
    out = {}

    def run():
        for i, text in enumerate(NASTY):
            t0 = time.perf_counter()
            out[i] = (score_math(text, "5", "math-verify"), time.perf_counter() - t0)

    t = threading.Thread(target=run)  # from a thread, as the trainer might
    t.start()
    t.join(len(NASTY) * (answers.HARD_TIMEOUT_S + 5))
    assert not t.is_alive() and len(out) == len(NASTY)
    for i, (s, seconds) in out.items():
        assert seconds < answers.HARD_TIMEOUT_S + 5, (i, seconds)
        assert s.checker == MV
    assert not out[0][0].correct and not out[7][0].correct


def test_a_stuck_worker_is_killed_and_replaced():
    w = MathVerifyWorker(hard_timeout_s=1.0)
    try:
        assert w.available()
        t0 = time.perf_counter()
        assert w.equal("10^{10^{10}}", "5") is False  # Math-Verify's own 5 s limit is longer than the hard one
        assert time.perf_counter() - t0 < 5 and w.timeouts == 1
        w.hard_timeout_s = answers.HARD_TIMEOUT_S
        assert w.equal("0.5", "\\frac{1}{2}") is True  # a fresh worker
    finally:
        w.close()


# ---------------------------------------------------------------- what the reports say
class BoxingEngine:
    """Boxes the gold answer of the even items (looked up by prompt), 'zzz' otherwise."""

    def __init__(self, targets):
        self.targets = targets

    def generate(self, prompts, params):
        from megatron_pz.rollout.protocol import GenerationResult

        return [[GenerationResult(i, [1], [0.0], "stop", 0, text=boxed(self.targets[tuple(p)][1]
                                                                        if self.targets[tuple(p)][0] % 2 == 0
                                                                        else "zzz"))]
                for i, p in enumerate(prompts)]


@pytest.mark.parametrize("suite, checker", [("gsm8k", MV), ("mmlu", "option letter")])
def test_suite_results_and_reports_name_the_checker(tmp_path, suite, checker):
    from megatron_pz.eval.report import write_reports
    from megatron_pz.eval.runner import run_suite
    from megatron_pz.eval.suites import load_suite

    items = load_suite(suite, limit=4, seed=1)
    encode = lambda s: [ord(c) % 250 for c in s]  # noqa: E731
    targets = {tuple(encode(it.prompt_text)): (i, it.target) for i, it in enumerate(items)}
    res = run_suite(BoxingEngine(targets), encode, None, suite, limit=4, seed=1, prompt_style="plain")
    assert res.config["checker"].startswith(checker) and res.metrics["accuracy"] == pytest.approx(0.5)
    if suite == "gsm8k":
        assert res.metrics["checker_timeouts"] == 0
    report = write_reports([res], tmp_path).read_text()
    assert f"checker {res.config['checker']}" in report
    assert json.loads((tmp_path / f"eval_{suite}.json").read_text())["config"]["checker"] == res.config["checker"]
