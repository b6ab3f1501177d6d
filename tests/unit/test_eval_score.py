"""Scorers: span exact match (strict/lenient), maths, multiple choice, mean@k and the unbiased pass@k."""
from math import comb

import pytest

from megatron_pz.eval.score import (mean_at_k, mean_pass_at_k, pass_at_k, score_choice, score_math,
                                    score_response, score_span)


def test_span_strict_and_lenient():
    s = score_span("reasoning... \\boxed{ Denver Broncos }", "Denver Broncos")
    assert s.extracted == " Denver Broncos " and s.correct and s.lenient
    s = score_span("\\boxed{denver broncos.}", "Denver Broncos")
    assert not s.correct and s.lenient
    s = score_span("no box: Denver Broncos", "Denver Broncos")
    assert s.extracted is None and not s.correct and not s.lenient


def test_span_restated_scores_the_continuation():
    s = score_span(" Denver Broncos won", "Denver Broncos", restate=True)
    assert s.extracted == "Denver Broncos" and s.correct and s.lenient
    s = score_span(" denver broncos.", "Denver Broncos", restate=True)
    assert s.extracted == "denver broncos" and not s.correct and s.lenient
    s = score_span(" \\boxed{Denver Broncos}", "Denver Broncos", restate=True)  # a box is not a continuation
    assert s.extracted is None and not s.correct
    assert not score_span(" Denver", "Denver Broncos", restate=True).lenient  # too few words
    assert score_response("span", " Denver Broncos", "Denver Broncos", {}, restate=True).correct


def test_math_and_choice_scores():
    assert score_math("so \\boxed{\\dfrac{1}{2}}", "0.5").correct
    assert not score_math("so \\boxed{2}", "0.5").correct
    assert score_choice("\\boxed{b}", "B").correct is False  # lower-case b is not an option letter
    assert score_choice("Answer: B", "B").correct
    assert score_response("choice", "\\boxed{D}", "D", {"num_options": 4}).correct
    assert not score_response("choice", "\\boxed{E}", "E", {"num_options": 4}).correct
    with pytest.raises(ValueError):
        score_response("poetry", "x", "y")


def test_pass_at_k_hand_computed():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=1: c/n
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(3, 0, 3) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong -> any k contains a correct one
    # large n stays finite and matches the exact binomial form
    assert pass_at_k(200, 7, 50) == pytest.approx(1 - comb(193, 50) / comb(200, 50))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_mean_at_k_and_mean_pass_at_k():
    rows = [[True, False, False, False], [True, True, True, True], [False] * 4]
    # item means 0.25, 1, 0 -> 1.25/3
    assert mean_at_k(rows) == pytest.approx(1.25 / 3)
    # pass@2: 0.5, 1, 0
    assert mean_pass_at_k(rows, 2) == pytest.approx(1.5 / 3)
    assert mean_pass_at_k(rows, 1) == pytest.approx(mean_at_k(rows))
    assert mean_at_k([]) == 0.0 and mean_at_k([[]]) == 0.0
