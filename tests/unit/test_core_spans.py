"""Span rules [PZ §4.4]: hand cases per reason and mode, property tests on arbitrary text, the random-span sampler."""
import random
import time
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from megatron_pz.data.spans import (
    MAX_TRIES_LIMIT,
    SPAN_MODES,
    RandomSpanConfig,
    SpanConfig,
    SpanReason,
    apply_span,
    find_occurrences,
    geometric_length,
    is_word_boundary,
    replace_at,
    sample_random_span,
    unmask,
    word_offsets,
)
from megatron_pz.errors import ConfigError

P = "The cat sat on the mat. The cat slept."
DEFAULT = SpanConfig()


def test_default_replaces_every_occurrence():
    r = apply_span(P, "cat", DEFAULT)
    assert r.valid and r.reason is SpanReason.VALID
    assert r.masked_text == "The [mask] sat on the mat. The [mask] slept."
    assert r.positions == (4, 28) and r.num_occurrences == 2 and r.span == "cat"


def test_span_is_stripped_by_default_and_not_when_disabled():
    assert apply_span(P, "  cat\n", DEFAULT).masked_text == "The [mask] sat on the mat. The [mask] slept."
    r = apply_span(P, " cat ", SpanConfig(strip_span=False))
    assert r.masked_text == "The[mask]sat on the mat. The[mask]slept." and r.span == " cat "


@pytest.mark.parametrize(
    "span, reason",
    [(None, SpanReason.MISSING), ("", SpanReason.EMPTY), (" \n\t", SpanReason.EMPTY), ("dog", SpanReason.NOT_FOUND),
     ("Cat", SpanReason.NOT_FOUND), ("cat  sat", SpanReason.NOT_FOUND)],
)
def test_invalid_reasons(span, reason):
    r = apply_span(P, span, DEFAULT)
    assert r.reason is reason and not r.valid and r.masked_text is None and r.positions == ()


def test_occurrence_limit_is_strictly_less_than_eight():
    seven = " ".join(["x"] * 7) + " end"
    eight = " ".join(["x"] * 8) + " end"
    assert apply_span(seven, "x", DEFAULT).valid
    r = apply_span(eight, "x", DEFAULT)
    assert r.reason is SpanReason.TOO_FREQUENT and r.num_occurrences == 8
    assert apply_span("x x x", "x", SpanConfig(max_occurrences=3)).reason is SpanReason.TOO_FREQUENT
    assert apply_span("x x", "x", SpanConfig(max_occurrences=3)).valid


def test_occurrences_do_not_overlap():
    assert find_occurrences("aaaa", "aa") == [0, 2]
    assert find_occurrences("aaa", "aa") == [0]
    assert apply_span("aaaa", "aa", DEFAULT).masked_text == "[mask][mask]"


def test_mask_token_in_paragraph_or_span_is_rejected():
    assert apply_span("a [mask] b", "b", DEFAULT).reason is SpanReason.MASK_TOKEN_IN_TEXT
    assert apply_span("a [mask] b", "[mask]", DEFAULT).reason is SpanReason.MASK_TOKEN_IN_TEXT
    # a custom mask token is what counts
    assert apply_span("a [mask] b", "b", SpanConfig(mask_token="<M>")).masked_text == "a [mask] <M>"


def test_one_mask_replaces_exactly_one_seeded_occurrence():
    seen = set()
    for seed in range(20):
        r = apply_span(P, "cat", SpanConfig(mode="one_mask"), seed=seed)
        assert r.valid and r.num_occurrences == 2 and len(r.positions) == 1
        assert r.masked_text.count("[mask]") == 1 and r.masked_text.count("cat") == 1
        assert r == apply_span(P, "cat", SpanConfig(mode="one_mask"), seed=seed)  # deterministic
        seen.add(r.positions[0])
    assert seen == {4, 28}  # both occurrences get picked over seeds
    assert apply_span(P, "cat", SpanConfig(mode="one_mask"), seed=0).masked_text in (
        "The [mask] sat on the mat. The cat slept.",
        "The cat sat on the mat. The [mask] slept.",
    )


@pytest.mark.parametrize(
    "paragraph, span, valid",
    [
        ("The cat sat.", "cat", True),
        ("The cat sat; concatenate.", "cat", False),  # second occurrence is inside a word
        ("The cat sat.", "at", False),
        ("The cat sat.", "he cat", False),
        ("served the U.S. army", "U.S.", True),  # punctuation at the edge is fine
        ("Marcel-Paul Schützenberger", "Schütz", False),  # Unicode letters are word characters
        ("Marcel-Paul Schützenberger", "Paul", True),  # hyphen is a boundary
        ("snake_case word", "snake", False),  # underscore is a word character
        ("The cat sat.", "The cat sat.", True),
    ],
)
def test_words_mode(paragraph, span, valid):
    r = apply_span(paragraph, span, SpanConfig(mode="words"))
    assert r.valid is valid
    if not valid:
        assert r.reason is SpanReason.NOT_WORDS
    # the default mode accepts the same spans at the character level
    assert apply_span(paragraph, span, DEFAULT).valid


def test_word_boundary():
    assert is_word_boundary("ab", 0) and is_word_boundary("ab", 2) and not is_word_boundary("ab", 1)
    assert is_word_boundary("a b", 1) and is_word_boundary("a.b", 2)


@pytest.mark.parametrize(
    "kwargs", [{"mode": "all"}, {"max_occurrences": 1}, {"max_occurrences": 0}, {"max_occurrences": -8},
               {"max_occurrences": 8.0}, {"max_occurrences": True}, {"mask_token": " "}, {"mask_token": ""},
               {"mask_token": None}, {"strip_span": "yes"}]
)
def test_span_config_validation(kwargs):
    # the message names the run-config key, e.g. "span.max_occurrences=1: ..."
    with pytest.raises(ConfigError, match=r"^span\." + next(iter(kwargs)) + "="):
        SpanConfig(**kwargs)


def test_config_from_dict():
    assert SpanConfig(**{"mode": "words", "max_occurrences": 4}).mode == "words"


# ---------------------------------------------------------------- properties on arbitrary text
_ALPHABET = st.sampled_from(list("ab c.,\n[]mask") + ["[mask]", "é", "ß", "_", "-", " "])
_TEXT = st.one_of(st.text(max_size=80), st.lists(_ALPHABET, max_size=60).map("".join))


@settings(max_examples=300, deadline=None)
@given(paragraph=_TEXT, data=st.data(), mode=st.sampled_from(["default", "one_mask", "words"]))
def test_accepted_substring_always_refinds_its_span(paragraph, data, mode):
    i = data.draw(st.integers(0, len(paragraph)))
    j = data.draw(st.integers(i, len(paragraph)))
    span = paragraph[i:j]
    cfg = SpanConfig(mode=mode)
    r = apply_span(paragraph, span, cfg, seed=data.draw(st.integers(0, 2**31)))
    stripped = span.strip()
    if not stripped:
        assert r.reason is SpanReason.EMPTY
        return
    if "[mask]" in paragraph:
        assert r.reason is SpanReason.MASK_TOKEN_IN_TEXT
        return
    # a substring of the paragraph is never "not found"
    assert r.reason is not SpanReason.NOT_FOUND
    if r.num_occurrences >= 8:
        assert r.reason is SpanReason.TOO_FREQUENT
    if r.valid:
        assert r.span == stripped
        assert 1 <= len(r.positions) <= r.num_occurrences < 8
        for p in r.positions:
            assert paragraph[p : p + len(stripped)] == stripped
        assert r.masked_text.count("[mask]") == len(r.positions)
        assert unmask(r.masked_text, stripped) == paragraph
        if mode == "words":
            assert all(is_word_boundary(paragraph, p) and is_word_boundary(paragraph, p + len(stripped))
                       for p in find_occurrences(paragraph, stripped))


@settings(max_examples=200, deadline=None)
@given(paragraph=_TEXT, span=st.one_of(st.none(), _TEXT), mode=st.sampled_from(["default", "one_mask", "words"]))
def test_arbitrary_span_never_raises_and_valid_means_roundtrip(paragraph, span, mode):
    r = apply_span(paragraph, span, SpanConfig(mode=mode))
    assert isinstance(r.reason, SpanReason)
    if r.valid:
        assert unmask(r.masked_text, r.span) == paragraph


# ---------------------------------------------------------------- random-span baseline
def test_geometric_length_inverse_cdf_hand_values():
    # P(len <= k) = 1 - 0.8^k: 0.2, 0.36, 0.488, 0.5904, ...
    assert geometric_length(0.0, 0.2, 10) == 1
    assert geometric_length(0.19, 0.2, 10) == 1
    assert geometric_length(0.21, 0.2, 10) == 2
    assert geometric_length(0.35, 0.2, 10) == 2
    assert geometric_length(0.5, 0.2, 10) == 4
    assert geometric_length(0.99, 0.2, 10) == 10  # 21 before clipping
    assert geometric_length(0.99, 0.2, 100) == 21
    assert geometric_length(0.7, 1.0, 10) == 1


def test_geometric_length_moments():
    rng = random.Random(0)
    draws = [geometric_length(rng.random(), 0.2, 10_000) for _ in range(40_000)]
    assert abs(sum(draws) / len(draws) - 5.0) < 0.1  # E[Geo(0.2)] = 1/p
    clipped = [min(d, 10) for d in draws]
    assert abs(sum(clipped) / len(clipped) - (1 - 0.8**10) / 0.2) < 0.06  # E[min(G,10)] = 4.4631


def test_word_offsets():
    text = "Don't stop—anti-war, U.S. 1,000 _x"
    assert [text[a:b] for a, b in word_offsets(text)] == ["Don't", "stop", "anti-war", "U", "S", "1", "000", "x"]


def test_sample_random_span_is_whole_words_and_seeded():
    paragraph = ("Ralph Hanover won seventeen additional stakes events, including the very important "
                 "Adios and Meadowlands Pace.")
    starts = {a for a, _ in word_offsets(paragraph)}
    ends = {b for _, b in word_offsets(paragraph)}
    results = [sample_random_span(paragraph, DEFAULT, RandomSpanConfig(), random.Random(s)) for s in range(50)]
    for r in results:
        assert r.valid
        p = r.positions[0]
        assert p in starts and p + len(r.span) in ends
        assert 1 <= len(word_offsets(r.span)) <= 10
        assert unmask(r.masked_text, r.span) == paragraph
    assert len({r.span for r in results}) > 10
    again = sample_random_span(paragraph, DEFAULT, RandomSpanConfig(), random.Random(3))
    assert again == results[3]


def test_sample_random_span_never_masks_inside_words():
    # "art" is a word here but also sits inside "party": default mode is checked as words mode.
    paragraph = "art party"
    for s in range(30):
        r = sample_random_span(paragraph, DEFAULT, RandomSpanConfig(max_words=1), random.Random(s))
        assert r.span == "party" if r.valid else r.reason is SpanReason.NOT_WORDS


def test_sample_random_span_failures():
    assert sample_random_span("... !!!", DEFAULT, RandomSpanConfig(), random.Random(0)).reason is SpanReason.NOT_FOUND
    r = sample_random_span("the " * 9, DEFAULT, RandomSpanConfig(max_words=1, max_tries=3), random.Random(0))
    # 9 occurrences, but counting stops at the limit of 8: the verdict is the same
    assert r.reason is SpanReason.TOO_FREQUENT and r.num_occurrences == 8


@pytest.mark.parametrize("kwargs", [
    {"geometric_p": 0.0}, {"geometric_p": -0.2}, {"geometric_p": 1.5}, {"geometric_p": float("nan")},
    {"geometric_p": "0.2"}, {"geometric_p": True}, {"max_words": 0}, {"max_words": -1}, {"max_words": 2.0},
    {"max_tries": 0}, {"max_tries": -3}, {"max_tries": MAX_TRIES_LIMIT + 1}, {"max_tries": False}])
def test_random_span_config_validation(kwargs):
    with pytest.raises(ConfigError, match=r"^random_span\." + next(iter(kwargs)) + "="):
        RandomSpanConfig(**kwargs)


@settings(max_examples=200, deadline=None)
@given(paragraph=_TEXT, seed=st.integers(0, 2**31))
def test_sample_random_span_never_raises(paragraph, seed):
    assume("[mask]" not in paragraph)
    r = sample_random_span(paragraph, DEFAULT, RandomSpanConfig(), random.Random(seed))
    if r.valid:
        assert unmask(r.masked_text, r.span) == paragraph


# ---------------------------------------------------------------- bounded work on any paragraph
class _CountingStr(str):
    """A paragraph that counts the searches made in it, so a bound on work is asserted rather than a wall time."""

    def __new__(cls, text: str) -> "_CountingStr":
        obj = super().__new__(cls, text)
        obj.finds = obj.contains = 0
        return obj

    def find(self, *args) -> int:
        self.finds += 1
        return super().find(*args)

    def __contains__(self, item: object) -> bool:
        self.contains += 1
        return super().__contains__(item)


def test_occurrence_count_stops_at_the_limit():
    assert find_occurrences("a a a a", "a", limit=2) == [0, 2]
    assert find_occurrences("a a a a", "a", limit=9) == [0, 2, 4, 6]
    assert find_occurrences("a a a a", "a", limit=0) == []
    big = _CountingStr("a " * 500_000)
    r = apply_span(big, "a", DEFAULT)
    assert r.reason is SpanReason.TOO_FREQUENT and r.num_occurrences == 8
    assert big.finds == 8  # one find per occurrence up to the 8th, then stop; counting them all took 500_001
    # 7 occurrences then a megabyte without one: 7 hits and one miss that reads the rest once
    seven = _CountingStr("x " * 7 + "y" * 1_000_000)
    r = apply_span(seven, "x", DEFAULT)
    assert r.valid and r.num_occurrences == 7 and seven.finds == 8


def test_random_span_sampler_work_is_bounded_on_repetitive_megabytes():
    cfg = RandomSpanConfig()
    for text in ("a " * 500_000, "the cat " * 100_000):
        big = _CountingStr(text)
        start = time.perf_counter()
        r = sample_random_span(big, DEFAULT, cfg, random.Random(0))
        elapsed = time.perf_counter() - start
        # every whole-word span of up to 10 words recurs thousands of times: all 16 tries fail at the 8th find
        assert r.reason is SpanReason.TOO_FREQUENT and r.num_occurrences == 8
        assert big.finds == cfg.max_tries * 8
        assert big.contains == 1 + cfg.max_tries  # the mask-token scan: once up front, once per try
        print(f"sample_random_span on {len(text):,} chars of {text[:8]!r}...: {elapsed:.2f} s")


def test_random_span_sampler_gives_up_at_once_on_a_paragraph_with_the_mask_token():
    big = _CountingStr("a [mask] b " + "word " * 10_000)
    r = sample_random_span(big, DEFAULT, RandomSpanConfig(max_tries=MAX_TRIES_LIMIT), random.Random(0))
    assert r.reason is SpanReason.MASK_TOKEN_IN_TEXT and big.finds == 0 and big.contains == 1


def test_geometric_length_tiny_p_clips_instead_of_overflowing():
    # log1p(-0.5) / log1p(-5e-324) overflows to inf: the draw is clipped to max_words, not an OverflowError
    assert geometric_length(0.5, 5e-324, 10) == 10
    assert geometric_length(0.0, 5e-324, 10) == 1  # u = 0 is the shortest span for every p
    assert geometric_length(0.5, 1e-300, 3) == 3
    r = sample_random_span("one two three four", DEFAULT, RandomSpanConfig(geometric_p=5e-324, max_words=3),
                           random.Random(0))
    assert r.valid and len(word_offsets(r.span)) == 3


# ---------------------------------------------------------------- the round trip: unmasking restores the paragraph
def test_self_overlapping_mask_token_that_would_not_round_trip_is_refused():
    # "aa" overlaps itself: masking "b" in "ab" gives "aaa", and "aaa".replace("aa", "b") is "ba", not "ab"
    r = apply_span("ab", "b", SpanConfig(mask_token="aa"))
    assert r.reason is SpanReason.AMBIGUOUS_MASK and r.masked_text is None and r.num_occurrences == 1
    # same token, no "a" next to the span: "cb" -> "caa" -> "cb"
    r = apply_span("cb", "b", SpanConfig(mask_token="aa"))
    assert r.valid and r.masked_text == "caa" and unmask(r.masked_text, "b", "aa") == "cb"
    # "aba": "ab c" -> "ababa", whose first "aba" is at 0, so it unmasks to " cba"
    assert apply_span("ab c", " c", SpanConfig(mask_token="aba", strip_span=False)).reason is SpanReason.AMBIGUOUS_MASK
    for seed in range(4):  # either occurrence in one_mask mode: "aaa ab" and "ab aaa" both fail
        assert apply_span("ab ab", "b", SpanConfig(mode="one_mask", mask_token="aa"),
                          seed=seed).reason is SpanReason.AMBIGUOUS_MASK


def test_mask_token_fragments_next_to_the_span_still_round_trip():
    # "[mask]" cannot overlap itself, so fragments of it around the span never pair up with ours
    r = apply_span("[maskX]", "X", DEFAULT)
    assert r.valid and r.masked_text == "[mask[mask]]" and unmask(r.masked_text, "X") == "[maskX]"
    r = apply_span("mask] X [mas", "X", DEFAULT)
    assert r.valid and r.masked_text == "mask] [mask] [mas" and unmask(r.masked_text, "X") == "mask] X [mas"


def _overlaps_itself(token: str) -> bool:
    return any(token[:k] == token[-k:] for k in range(1, len(token)))


def test_valid_means_unmasking_restores_the_paragraph_over_random_paragraphs_and_tokens():
    """The documented property, over seeded random paragraphs, spans, modes and mask tokens (some self-overlapping)."""
    rng = random.Random(20261201)
    tokens = ["[mask]", "<m>", "ab", "ba", "[a]", "aa", "aba", "a a", "]["]
    seen: Counter[SpanReason] = Counter()
    for _ in range(6000):
        token = rng.choice(tokens)
        paragraph = "".join(rng.choice("ab []m") for _ in range(rng.randrange(30)))
        i = rng.randrange(len(paragraph) + 1)
        span = paragraph[i : rng.randrange(i, len(paragraph) + 1)]
        cfg = SpanConfig(mode=rng.choice(SPAN_MODES), mask_token=token, max_occurrences=rng.choice([2, 8]))
        seed = rng.randrange(2**31)
        r = apply_span(paragraph, span, cfg, seed=seed)
        seen[r.reason] += 1
        if r.valid:
            assert unmask(r.masked_text, r.span, token) == paragraph
            assert all(paragraph.startswith(r.span, p) for p in r.positions)
            assert token not in paragraph
        elif r.reason is SpanReason.AMBIGUOUS_MASK:
            assert _overlaps_itself(token)  # the module docstring's claim: other tokens never need the check
            # and masking as the rules say really does not come back
            positions = find_occurrences(paragraph, r.span, cfg.max_occurrences)
            chosen = positions if cfg.mode != "one_mask" else [positions[random.Random(seed).randrange(len(positions))]]
            assert unmask(replace_at(paragraph, chosen, len(r.span), token), r.span, token) != paragraph
    # both outcomes are exercised, so the assertions above are not vacuous
    assert seen[SpanReason.VALID] > 500 and seen[SpanReason.AMBIGUOUS_MASK] > 20, seen
