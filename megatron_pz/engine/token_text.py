"""One token's text and bytes for OpenAI log-probs, without losing byte fragments.

A byte-level BPE token that holds part of a multi-byte character decodes to U+FFFD, so different tokens would
share one ``top_logprobs`` key. As SGLang does (``_lossless_token_text`` in
``sglang/srt/entrypoints/openai/utils.py``), such a token's raw bytes are recovered from its vocabulary piece
through GPT-2's byte table and, when they are not valid UTF-8 by themselves, shown as latin-1 (one character per
byte). Tokenizers whose pieces are not byte-level (SentencePiece) keep the decoded text.
"""
from __future__ import annotations

from typing import Any


def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: printable stand-in character -> raw byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for c, b in zip(cs, bs)}


_BYTE_DECODER = _byte_decoder()


class TokenText:
    """``(text, bytes)`` of token ids for one tokenizer (None: every text is empty), cached per id."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, tok: int) -> tuple[str, list[int]]:
        hit = self._cache.get(tok)
        if hit is None:
            hit = self._cache[tok] = self._compute(tok)
        return hit

    def text(self, tok: int) -> str:
        return self(tok)[0]

    def _compute(self, tok: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            return "", []
        text = self.tokenizer.decode([tok])
        if "\ufffd" not in text:
            return text, list(text.encode("utf-8"))
        raw = self._raw_bytes(tok)
        if raw is None:
            return text, list(text.encode("utf-8"))
        try:
            raw.decode("utf-8")  # a whole character (U+FFFD itself, say): the decoded text is right
            return text, list(raw)
        except UnicodeDecodeError:
            return raw.decode("latin-1"), list(raw)

    def _raw_bytes(self, tok: int) -> bytes | None:
        try:
            piece = self.tokenizer.convert_ids_to_tokens(tok)
        except Exception:  # noqa: BLE001 - a tokenizer without pieces keeps its decoded text
            return None
        if not isinstance(piece, str) or not piece or any(ch not in _BYTE_DECODER for ch in piece):
            return None
        return bytes(_BYTE_DECODER[ch] for ch in piece)
