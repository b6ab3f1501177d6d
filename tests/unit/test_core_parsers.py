"""\\mask{} / \\boxed{} extraction: hand cases, random text (hypothesis) and megabyte adversarial outputs."""
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pz.data.parsers import (
    extract_boxed,
    extract_boxed_after_think,
    extract_last_command,
    extract_mask,
    find_last_command,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{stakes}.", "stakes"),
        ("\\boxed{a} then \\boxed{b}", "b"),  # last occurrence wins
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces kept
        ("\\boxed{a \\boxed{b}}", "b"),  # last *start* among balanced ones (MATH-eval convention)
        ("\\boxed{a} \\boxed{b", "a"),  # unterminated tail: fall back to the last balanced one
        ("\\boxed{unterminated", None),
        ("no command here", None),
        ("", None),
        ("\\boxed{}", ""),  # empty content is returned (the span rules reject it, not the parser)
        ("\\boxed {x}", None),  # a space before '{' is not the command
        ("\\boxed{\\{x\\}}", "\\{x\\}"),  # escaped braces do not count and are kept verbatim
        ("\\boxed{a\\}", None),  # the only closer is escaped: unterminated
        ("\\boxed{a\\\\}", "a\\\\"),  # escaped backslash, then a real closing brace
        ("}}} \\boxed{x} {{{", "x"),  # stray braces around do not matter
        ("\\boxed{x}}", "x"),
        ("{\\boxed{x}", "x"),  # an unmatched outer '{' does not swallow the command
        ("\\boxed{ spaced  }", " spaced  "),  # no stripping here
        ("\\boxed{\n multi\nline }", "\n multi\nline "),
    ],
)
def test_extract_boxed_hand_cases(text, expected):
    assert extract_boxed(text) == expected


def test_mask_and_boxed_are_independent():
    text = "Thinking... \\mask{Noam Chomsky} and also \\boxed{1956}"
    assert extract_mask(text) == "Noam Chomsky"
    assert extract_boxed(text) == "1956"
    assert extract_last_command(text, "emph") is None


def test_find_last_command_positions():
    text = "xx\\mask{ab}yy"
    start, end = find_last_command(text, "mask")
    assert (start, end) == (8, 10) and text[start:end] == "ab"


def test_boxed_after_think():
    assert extract_boxed_after_think("<think>\\boxed{draft}</think> final \\boxed{ para}") == " para"
    assert extract_boxed_after_think("<think>\\boxed{draft}</think> no answer") is None
    assert extract_boxed_after_think("no think tags \\boxed{x}") == "x"


def test_non_string_input_is_none():
    assert extract_boxed(None) is None  # type: ignore[arg-type]


_NOISE = st.sampled_from(["\\boxed{", "\\mask{", "{", "}", "\\", "\\{", "\\}", "boxed", "mask", " ", "x", "é", "\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), _NOISE), max_size=60).map("".join))
def test_random_text_never_raises_and_result_is_balanced(text):
    for name in ("boxed", "mask"):
        found = find_last_command(text, name)
        if found is None:
            continue
        start, end = found
        assert text[start - len(name) - 2 : start] == "\\" + name + "{"
        assert text[end] == "}"
        # the content itself has balanced unescaped braces
        depth, i, content = 0, 0, text[start:end]
        while i < len(content):
            ch = content[i]
            if ch == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            assert depth >= 0
            i += 1
        assert depth == 0


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(max_size=50), answer=st.text(max_size=30), suffix=st.text(max_size=50))
def test_planted_answer_is_found(prefix, answer, suffix):
    """A balanced answer planted last, after arbitrary text with no command, is returned exactly."""
    answer = answer.replace("\\", "").replace("{", "").replace("}", "")
    prefix = prefix.replace("\\", "")
    suffix = suffix.replace("\\", "")
    assert extract_boxed(prefix + "\\boxed{" + answer + "}" + suffix) == answer


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 200_000,  # 1.4 MB of unterminated openers
        "\\boxed{" * 200_000 + "x" + "}" * 200_000,  # 200k-deep nesting, all balanced
        "{" * 1_000_000 + "\\boxed{x}" + "}" * 1_000_000,
        "\\" * 2_000_001 + "{x}",  # long escape run
        ("\\mask{a}" + "\\boxed{" + "}" * 3) * 100_000,
    ],
    ids=["unterminated_openers", "deep_nesting", "brace_flood", "backslash_run", "mixed_repeats"],
)
def test_megabyte_adversarial_outputs_do_not_hang(text):
    t0 = time.perf_counter()
    extract_boxed(text)
    extract_mask(text)
    assert time.perf_counter() - t0 < 5.0  # hang guard, not a speed target


def test_deep_nesting_result():
    n = 200_000
    assert extract_boxed("\\boxed{" * n + "x" + "}" * n) == "x"
    assert extract_boxed("\\boxed{" * n) is None
