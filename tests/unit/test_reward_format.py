"""The learnability rewards (rewards/format.py) on hand-computed values."""
import pytest

from megatron_pz.rewards.format import BREVITY_CHARS, brevity, format_boxed
from megatron_pz.rewards.registry import get_reward


@pytest.mark.parametrize("response, expected", [
    ("so the answer is \\boxed{Paris}", 1.0),
    ("\\boxed{ x }", 1.0),                         # surrounding spaces are fine, the content is not empty
    ("\\boxed{}", 0.0),                            # empty
    ("\\boxed{   }", 0.0),                         # whitespace only
    ("\\boxed{a} then \\boxed{}", 0.0),            # the last box is the one the span rewards read
    ("\\boxed{a} then \\boxed{b", 1.0),            # an unterminated tail is not a box: the last balanced one is a
    ("the answer is Paris", 0.0),
    ("\\boxed {Paris}", 0.0),                      # no space allowed before the brace
    ("", 0.0),
])
def test_format_boxed(response, expected):
    assert format_boxed(response, "ignored target") == expected


def test_brevity_hand_values():
    assert BREVITY_CHARS == 128
    assert brevity("", "t") == 1.0
    assert brevity("x" * 32, "t") == 0.75          # 1 - 32/128
    assert brevity("x" * 96, "t") == 0.25          # 1 - 96/128
    assert brevity("x" * 128, "t") == 0.0
    assert brevity("x" * 500, "t") == 0.0          # floored, never negative
    assert brevity("é" * 64, "t") == 0.5           # characters, not bytes


def test_registered_by_name_and_path():
    assert get_reward("format_boxed") is format_boxed and get_reward("brevity") is brevity
    assert get_reward("megatron_pz.rewards.format:brevity") is brevity
