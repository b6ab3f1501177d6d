"""Span rules: validate a span against a paragraph and replace it by ``[mask]``; random spans for the baseline.

Pure and seeded: no I/O, no tokenizer. The rules [PZ §3.2, §4.4; method §2.2 and §6 items 8–9]:

* The span is taken verbatim from the generator's ``\\mask{...}`` and, by default, stripped of surrounding
  whitespace (``strip_span``); an empty span is invalid (``EMPTY``), a missing one is ``MISSING``.
* Occurrences are counted left to right without overlap, exactly like ``str.count`` / ``str.replace``
  (so ``"aa"`` occurs twice in ``"aaaa"``, not three times). The span must occur at least once
  (``NOT_FOUND``) and fewer than ``max_occurrences`` (= 8) times (``TOO_FREQUENT``) [PZ §4.4].
* ``mode="default"`` replaces every occurrence by the mask token (INFERENCE, method §2.2);
  ``"one_mask"`` replaces one occurrence chosen by a seeded RNG [PZ §4.4 PretrainZero-OneMask];
  ``"words"`` replaces every occurrence but rejects the span unless every occurrence starts and ends at a word
  boundary (``NOT_WORDS``) [PZ §4.4 PretrainZero-Words].
* A paragraph that already contains the mask token is rejected (``MASK_TOKEN_IN_TEXT``), and so is a span that
  contains it: otherwise the predictor could not tell our ``[mask]`` from the paragraph's own, and the
  masked paragraph would not determine where the span goes back. With this rule, re-inserting the span at
  every mask token of the masked paragraph always reproduces the paragraph (property-tested).

Word characters are those of ``str.isalnum()`` plus ``_`` (Unicode-aware, like regex ``\\w``). A word boundary
lies between two characters unless both are word characters; the text edges are boundaries.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import random
import re
from dataclasses import dataclass

from megatron_pz.errors import ConfigError

SPAN_MODES = ("default", "one_mask", "words")


@dataclass
class SpanConfig:
    """How a generated span is validated and masked [PZ §4.4]."""

    mode: str = "default"
    """"default" (replace all occurrences), "one_mask" (replace one, seeded), "words" (all; whole words only)."""
    max_occurrences: int = 8
    """A span is valid only if it occurs fewer than this many times in the paragraph [PZ §4.4: "fewer than eight"]."""
    mask_token: str = "[mask]"
    """Literal string that replaces the span in the predictor's passage [PZ Fig. 5]."""
    strip_span: bool = True
    """Strip whitespace around the ``\\mask{}`` content before matching (INFERENCE; the target is the stripped span)."""

    def __post_init__(self) -> None:
        if self.mode not in SPAN_MODES:
            raise ConfigError(f"SpanConfig.mode={self.mode!r}: expected one of {SPAN_MODES}")
        if not isinstance(self.max_occurrences, int) or self.max_occurrences < 2:
            raise ConfigError(f"SpanConfig.max_occurrences={self.max_occurrences!r}: expected an int >= 2")
        if not isinstance(self.mask_token, str) or not self.mask_token.strip():
            raise ConfigError(f"SpanConfig.mask_token={self.mask_token!r}: expected a non-blank string")


@dataclass
class RandomSpanConfig:
    """Random-span RLPT baseline: SpanBERT-style whole-word spans (INFERENCE, method §6 item 13)."""

    geometric_p: float = 0.2
    """Span length in words ~ Geometric(p), P(len = k) = p (1-p)^(k-1) [SpanBERT: p = 0.2]."""
    max_words: int = 10
    """Lengths are clipped to this many words [SpanBERT: 10]."""
    max_tries: int = 16
    """Resample start/length up to this many times when a span breaks the span rules (e.g. "the" x 9)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.geometric_p <= 1.0:
            raise ConfigError(f"RandomSpanConfig.geometric_p={self.geometric_p!r}: expected 0 < p <= 1")
        if not isinstance(self.max_words, int) or self.max_words < 1:
            raise ConfigError(f"RandomSpanConfig.max_words={self.max_words!r}: expected an int >= 1")
        if not isinstance(self.max_tries, int) or self.max_tries < 1:
            raise ConfigError(f"RandomSpanConfig.max_tries={self.max_tries!r}: expected an int >= 1")


class SpanReason(str, enum.Enum):
    """Why a span was accepted or rejected; metrics count these (mask-validity breakdown)."""

    VALID = "valid"
    MISSING = "missing"  # no \mask{...} in the output (or unterminated)
    EMPTY = "empty"  # blank after stripping
    NOT_FOUND = "not_found"  # not a verbatim substring of the paragraph
    TOO_FREQUENT = "too_frequent"  # occurs >= max_occurrences times
    NOT_WORDS = "not_words"  # words mode: an occurrence cuts through a word
    MASK_TOKEN_IN_TEXT = "mask_token_in_text"  # paragraph or span already contains the mask token


@dataclass(frozen=True)
class SpanResult:
    """Outcome of applying a span to a paragraph.

    ``positions`` are the character offsets in the *original* paragraph of the occurrences that were replaced
    (empty when invalid); ``num_occurrences`` counts all non-overlapping occurrences found.
    """

    reason: SpanReason
    span: str | None = None
    masked_text: str | None = None
    positions: tuple[int, ...] = ()
    num_occurrences: int = 0

    @property
    def valid(self) -> bool:
        return self.reason is SpanReason.VALID


def find_occurrences(text: str, span: str) -> list[int]:
    """Start offsets of the non-overlapping occurrences of ``span`` in ``text``, left to right (``str.count``)."""
    if not span:
        return []
    out: list[int] = []
    pos = text.find(span)
    while pos != -1:
        out.append(pos)
        pos = text.find(span, pos + len(span))
    return out


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def is_word_boundary(text: str, i: int) -> bool:
    """True if offset ``i`` (0..len) of ``text`` is a word boundary (not between two word characters)."""
    if i <= 0 or i >= len(text):
        return True
    return not (_is_word_char(text[i - 1]) and _is_word_char(text[i]))


def apply_span(paragraph: str, span: str | None, cfg: SpanConfig, seed: int = 0) -> SpanResult:
    """Validate ``span`` against ``paragraph`` and mask it [PZ §3.2, §4.4].

    ``seed`` picks the occurrence in ``one_mask`` mode (``random.Random(seed)``) and is ignored otherwise.
    """
    if span is None:
        return SpanResult(SpanReason.MISSING)
    if cfg.strip_span:
        span = span.strip()
    if not span:
        return SpanResult(SpanReason.EMPTY, span=span)
    if cfg.mask_token in paragraph or cfg.mask_token in span:
        return SpanResult(SpanReason.MASK_TOKEN_IN_TEXT, span=span)
    positions = find_occurrences(paragraph, span)
    n = len(positions)
    if n == 0:
        return SpanResult(SpanReason.NOT_FOUND, span=span)
    if n >= cfg.max_occurrences:
        return SpanResult(SpanReason.TOO_FREQUENT, span=span, num_occurrences=n)
    if cfg.mode == "words" and not all(
        is_word_boundary(paragraph, p) and is_word_boundary(paragraph, p + len(span)) for p in positions
    ):
        return SpanResult(SpanReason.NOT_WORDS, span=span, num_occurrences=n)
    chosen = positions if cfg.mode != "one_mask" else [positions[random.Random(seed).randrange(n)]]
    return SpanResult(
        SpanReason.VALID,
        span=span,
        masked_text=replace_at(paragraph, chosen, len(span), cfg.mask_token),
        positions=tuple(chosen),
        num_occurrences=n,
    )


def replace_at(text: str, positions: list[int] | tuple[int, ...], length: int, replacement: str) -> str:
    """Replace ``text[p:p+length]`` by ``replacement`` for each (sorted, non-overlapping) ``p`` in ``positions``."""
    parts: list[str] = []
    prev = 0
    for p in positions:
        parts.append(text[prev:p])
        parts.append(replacement)
        prev = p + length
    parts.append(text[prev:])
    return "".join(parts)


def unmask(masked_text: str, span: str, mask_token: str = "[mask]") -> str:
    """Inverse of masking: put ``span`` back at every mask token (valid because the paragraph had none)."""
    return masked_text.replace(mask_token, span)


# ---------------------------------------------------------------- Random-span RLPT baseline
# A "word" is a run of word characters, optionally joined by an apostrophe or hyphen (don't, anti-war), so a
# span never starts or ends inside a word and never includes the punctuation around it.
_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")


def word_offsets(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of the words of ``text`` (see ``_WORD``)."""
    return [m.span() for m in _WORD.finditer(text)]


def geometric_length(u: float, p: float, max_words: int) -> int:
    """Inverse-CDF draw from Geometric(p) on {1, 2, ...}, clipped to ``max_words``; ``u`` is uniform in [0, 1).

    P(len <= k) = 1 - (1-p)^k, so len = 1 + floor(log(1-u) / log(1-p)) [SpanBERT §3.1].
    """
    if p >= 1.0:
        return 1
    k = 1 + int(math.floor(math.log1p(-u) / math.log1p(-p)))
    return max(1, min(k, max_words))


def sample_random_span(
    paragraph: str, span_cfg: SpanConfig, random_cfg: RandomSpanConfig, rng: random.Random
) -> SpanResult:
    """Random RLPT span [PZ §3.1 "Random Masked Span Reasoning"]: whole words, geometric length, seeded.

    Draws a length, then a uniform start word, and checks the span with ``apply_span`` under ``span_cfg``
    (occurrence limit, mask token). Because the baseline masks whole words, ``mode="default"`` is checked as
    ``"words"`` (every occurrence must be whole words: "art" is not masked inside "party"); ``"one_mask"`` and
    ``"words"`` are used as given. Retries up to ``max_tries`` times and returns the last failure (or
    ``NOT_FOUND`` for a paragraph without words).
    """
    if span_cfg.mode == "default":
        span_cfg = dataclasses.replace(span_cfg, mode="words")
    words = word_offsets(paragraph)
    if not words:
        return SpanResult(SpanReason.NOT_FOUND)
    result = SpanResult(SpanReason.NOT_FOUND)
    for _ in range(random_cfg.max_tries):
        length = min(geometric_length(rng.random(), random_cfg.geometric_p, random_cfg.max_words), len(words))
        first = rng.randrange(len(words) - length + 1)
        span = paragraph[words[first][0] : words[first + length - 1][1]]
        result = apply_span(paragraph, span, span_cfg, seed=rng.randrange(2**31))
        if result.valid:
            return result
    return result
