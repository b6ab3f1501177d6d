"""Span rules: validate a span against a paragraph and replace it by ``[mask]``; random spans for the baseline.

Pure and seeded: no I/O, no tokenizer. The rules [PZ §3.2, §4.4; method §2.2 and §6 items 8–9]:

* The span is taken verbatim from the generator's ``\\mask{...}`` and, by default, stripped of surrounding
  whitespace (``strip_span``); an empty span is invalid (``EMPTY``), a missing one is ``MISSING``.
* Occurrences are counted left to right without overlap, exactly like ``str.count`` / ``str.replace``
  (so ``"aa"`` occurs twice in ``"aaaa"``, not three times). The span must occur at least once
  (``NOT_FOUND``) and fewer than ``max_occurrences`` (= 8) times (``TOO_FREQUENT``) [PZ §4.4]. Counting stops
  at ``max_occurrences``: the verdict needs no more, and a span such as ``"a"`` in ``"a " * 500_000`` would
  otherwise cost a Python step per occurrence (so ``num_occurrences`` is at most ``max_occurrences``).
* ``mode="default"`` replaces every occurrence by the mask token (INFERENCE, method §2.2);
  ``"one_mask"`` replaces one occurrence chosen by a seeded RNG [PZ §4.4 PretrainZero-OneMask];
  ``"words"`` replaces every occurrence but rejects the span unless every occurrence starts and ends at a word
  boundary (``NOT_WORDS``) [PZ §4.4 PretrainZero-Words].
* A paragraph that already contains the mask token is rejected (``MASK_TOKEN_IN_TEXT``), and so is a span that
  contains it: otherwise the predictor could not tell our ``[mask]`` from the paragraph's own, and the
  masked paragraph would not determine where the span goes back.
* The masked paragraph must give the paragraph back: re-inserting the span at every mask token (``unmask``)
  must reproduce it, else ``AMBIGUOUS_MASK``. For a mask token that cannot overlap itself (no proper prefix
  that is also a suffix, like ``"[mask]"``) the rule above already guarantees this: a mask token in the masked
  paragraph that is not one of ours would lie inside the original text or overlap one of ours. A token such
  as ``"aa"`` can: masking ``"b"`` in ``"ab"`` gives ``"aaa"``, which unmasks to ``"ba"``; such spans are
  refused rather than trained on an ambiguous prompt (property-tested over random paragraphs and tokens).

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
MAX_TRIES_LIMIT = 1024
"""Largest ``random_span.max_tries``: a bound on the sampler's work per paragraph (each try scans it once)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        # Messages name the run-config key (the section is ``span``), so a YAML error points at the line to fix.
        if self.mode not in SPAN_MODES:
            raise ConfigError(f"span.mode={self.mode!r}: expected one of {SPAN_MODES}")
        # 1 would reject every span (a span occurs at least once); bool is an int but never meant as a count.
        if not _is_int(self.max_occurrences) or self.max_occurrences < 2:
            raise ConfigError(f"span.max_occurrences={self.max_occurrences!r}: expected an int >= 2 "
                              "(a span is kept when it occurs fewer than this many times)")
        if not isinstance(self.mask_token, str) or not self.mask_token.strip():
            raise ConfigError(f"span.mask_token={self.mask_token!r}: expected a non-blank string")
        if not isinstance(self.strip_span, bool):
            raise ConfigError(f"span.strip_span={self.strip_span!r}: expected true or false")


@dataclass
class RandomSpanConfig:
    """Random-span RLPT baseline: SpanBERT-style whole-word spans (INFERENCE, method §6 item 13)."""

    geometric_p: float = 0.2
    """Span length in words ~ Geometric(p), P(len = k) = p (1-p)^(k-1) [SpanBERT: p = 0.2]."""
    max_words: int = 10
    """Lengths are clipped to this many words [SpanBERT: 10]."""
    max_tries: int = 16
    """Resample start/length up to this many times when a span breaks the span rules (e.g. "the" x 9); at most
    ``MAX_TRIES_LIMIT``. Each try scans the paragraph about once, so this bounds a paragraph's sampling work."""

    def __post_init__(self) -> None:
        p = self.geometric_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:  # NaN fails too
            raise ConfigError(f"random_span.geometric_p={p!r}: expected a number with 0 < p <= 1")
        if not _is_int(self.max_words) or self.max_words < 1:
            raise ConfigError(f"random_span.max_words={self.max_words!r}: expected an int >= 1")
        if not _is_int(self.max_tries) or not 1 <= self.max_tries <= MAX_TRIES_LIMIT:
            raise ConfigError(f"random_span.max_tries={self.max_tries!r}: expected an int in [1, {MAX_TRIES_LIMIT}] "
                              "(each try scans the paragraph; a paragraph that fails this often is skipped)")


class SpanReason(str, enum.Enum):
    """Why a span was accepted or rejected; metrics count these (mask-validity breakdown)."""

    VALID = "valid"
    MISSING = "missing"  # no \mask{...} in the output (or unterminated)
    EMPTY = "empty"  # blank after stripping
    NOT_FOUND = "not_found"  # not a verbatim substring of the paragraph
    TOO_FREQUENT = "too_frequent"  # occurs >= max_occurrences times
    NOT_WORDS = "not_words"  # words mode: an occurrence cuts through a word
    MASK_TOKEN_IN_TEXT = "mask_token_in_text"  # paragraph or span already contains the mask token
    AMBIGUOUS_MASK = "ambiguous_mask"  # masking made a mask token of its own (a self-overlapping token): no round trip


@dataclass(frozen=True)
class SpanResult:
    """Outcome of applying a span to a paragraph.

    ``positions`` are the character offsets in the *original* paragraph of the occurrences that were replaced
    (empty when invalid); ``num_occurrences`` counts the non-overlapping occurrences found, up to the config's
    ``max_occurrences`` (counting stops there: ``TOO_FREQUENT`` reports exactly ``max_occurrences``).
    """

    reason: SpanReason
    span: str | None = None
    masked_text: str | None = None
    positions: tuple[int, ...] = ()
    num_occurrences: int = 0

    @property
    def valid(self) -> bool:
        return self.reason is SpanReason.VALID


def find_occurrences(text: str, span: str, limit: int | None = None) -> list[int]:
    """Start offsets of the non-overlapping occurrences of ``span`` in ``text``, left to right (``str.count``).

    With ``limit``, stops after the first ``limit`` occurrences: at most ``limit`` calls of ``text.find``, each
    resuming where the previous one stopped, so the whole search reads ``text`` at most once.
    """
    if not span or (limit is not None and limit < 1):
        return []
    out: list[int] = []
    pos = text.find(span)
    while pos != -1:
        out.append(pos)
        if limit is not None and len(out) >= limit:
            break
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
    positions = find_occurrences(paragraph, span, cfg.max_occurrences)
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
    masked = replace_at(paragraph, chosen, len(span), cfg.mask_token)
    # Only a self-overlapping mask token can fail here (see the module docstring); the check is one pass.
    if unmask(masked, span, cfg.mask_token) != paragraph:
        return SpanResult(SpanReason.AMBIGUOUS_MASK, span=span, num_occurrences=n)
    return SpanResult(SpanReason.VALID, span=span, masked_text=masked, positions=tuple(chosen), num_occurrences=n)


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
    """Inverse of masking: put ``span`` back at every mask token (``apply_span`` only accepts masks it inverts)."""
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
    # Compare as floats before int(): for a tiny p (5e-324) the quotient overflows to inf.
    x = math.log1p(-u) / math.log1p(-p)
    if not x < max_words:  # also catches inf and NaN
        return max(1, max_words)
    return max(1, min(1 + int(math.floor(x)), max_words))


def sample_random_span(
    paragraph: str, span_cfg: SpanConfig, random_cfg: RandomSpanConfig, rng: random.Random
) -> SpanResult:
    """Random RLPT span [PZ §3.1 "Random Masked Span Reasoning"]: whole words, geometric length, seeded.

    Draws a length, then a uniform start word, and checks the span with ``apply_span`` under ``span_cfg``
    (occurrence limit, mask token). Because the baseline masks whole words, ``mode="default"`` is checked as
    ``"words"`` (every occurrence must be whole words: "art" is not masked inside "party"); ``"one_mask"`` and
    ``"words"`` are used as given. Retries up to ``max_tries`` times and returns the last failure (or
    ``NOT_FOUND`` for a paragraph without words, ``MASK_TOKEN_IN_TEXT`` at once for a paragraph that contains
    the mask token: no span could fix that).

    Work is linear in the paragraph: one pass to list its words, then per try at most ``max_occurrences``
    ``str.find`` calls that together read the paragraph once, one scan for the mask token and, for a valid
    span, one masking and one unmasking pass. So a repetitive megabyte paragraph costs what reading it costs.
    """
    if span_cfg.mode == "default":
        span_cfg = dataclasses.replace(span_cfg, mode="words")
    if span_cfg.mask_token in paragraph:
        return SpanResult(SpanReason.MASK_TOKEN_IN_TEXT)
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
