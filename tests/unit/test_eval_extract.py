"""Answer extraction and the light maths checker on hand-written model outputs."""
import time

import pytest

from megatron_pz.eval.extract import extract_answer, extract_choice, math_equal, normalize_math, parse_number


@pytest.mark.parametrize("text, want", [
    ("So the total is \\boxed{42}.", "42"),
    ("first \\boxed{1} then corrected: \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{x^{2} + \\{y\\}}", "x^{2} + \\{y\\}"),
    ("\\boxed{a} and an unfinished \\boxed{b", "a"),
    ("Therefore, the answer is 17.", "17"),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "$\\frac{3}{4}$"),
    ("Final answer: 12 apples\nmore text", "12 apples"),
    ("She earns 5 * 2 = 10.\n#### 10", "10"),
    ("So, the answer is: 27", "27"),
    ("The correct answer is:\nC. It cannot pass parameters.", "C"),
    ("no answer here at all, 3 4 5", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("pred, gold", [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "1/2"),
    ("\\frac12", "\\frac{1}{2}"),
    ("1,000", "1000"),
    ("1,234,567", "1234567"),
    ("18.0", "18"),
    ("18.00", "18"),
    ("$18", "18"),
    ("\\$18", "18"),
    ("\\text{5}", "5"),
    ("5 \\text{ cm}", "5"),
    ("12 apples", "12"),
    ("50\\%", "50"),
    ("50\\%", "0.5"),
    ("x = 3", "3"),
    ("90^\\circ", "90"),
    ("025", "25"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("(1, 0.5)", "(1,\\frac{1}{2})"),
    ("0.33333", "1/3"),
])
def test_math_equal_accepts_equivalent_forms(pred, gold):
    assert math_equal(pred, gold), (normalize_math(pred), normalize_math(gold))


@pytest.mark.parametrize("pred, gold", [
    ("\\frac{1}{3}", "0.5"),
    ("1000", "100"),
    ("(1, 2)", "(2, 1)"),
    ("(1, 2)", "[1, 2]"),
    ("(1, 2)", "(1, 2, 3)"),
    ("", "0"),
    (None, "1"),
    ("x", "y"),
    ("0.3", "1/3"),
])
def test_math_equal_rejects_different_answers(pred, gold):
    assert not math_equal(pred, gold)


def test_parse_number_forms():
    assert parse_number("\\frac{3}{4}") == 0.75
    assert parse_number("-\\frac{1}{4}") == -0.25
    assert parse_number("7/2") == 3.5
    assert parse_number("1e3") == 1000.0
    assert parse_number("\\frac{1}{0}") is None
    assert parse_number("abc") is None
    assert parse_number("1e999") is None  # inf is not a number we compare


@pytest.mark.parametrize("text, n, want", [
    ("I think it is \\boxed{B}", 4, "B"),
    ("\\boxed{(C)}", 4, "C"),
    ("\\boxed{\\text{D}}", 4, "D"),
    ("\\boxed{A. Paris}", 4, "A"),
    ("Answer: C", 4, "C"),
    ("The answer is (B).", 4, "B"),
    ("so the answer is **J**", 10, "J"),
    ("\\boxed{E}", 4, None),          # only A-D offered
    ("\\boxed{Paris}", 4, None),      # a word is not a letter
    ("\\boxed{Apples}", 4, None),     # starts with A but is a word
    ("The options A and B are wrong", 4, None),  # no marker, no box
    ("\\boxed{A} ... wait, \\boxed{D}", 4, "D"),
])
def test_extract_choice(text, n, want):
    assert extract_choice(text, n) == want


def test_adversarial_outputs_are_fast_and_do_not_crash():
    nasty = [
        "\\boxed{" * 100_000,
        "}" * 100_000 + "\\boxed{1}",
        "the answer is " * 50_000,
        "1," * 200_000,
        "\\frac{" * 50_000 + "1" + "}" * 50_000,
        "(" * 100_000 + ")" * 100_000,
        "\\text{" * 50_000,
        "A" * 500_000,
        "\x00\uffff\ud7ff" * 10_000,
        "#### " + "9" * 100_000,
    ]
    start = time.perf_counter()
    for s in nasty:
        a = extract_answer(s)
        math_equal(a, "1")
        math_equal(s, s)
        extract_choice(s, 10)
        normalize_math(s)
    assert time.perf_counter() - start < 10.0
