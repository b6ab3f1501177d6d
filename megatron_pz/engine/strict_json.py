"""Request bodies parsed as strict JSON: what Python's ``json`` accepts but no client means is refused.

Each refusal is a ``BadJSON`` whose message names what is wrong and where, so the server answers 400 instead of
guessing or failing later with a 500:

* invalid UTF-8 (RFC 8259 requires UTF-8; ``json.loads`` on bytes would also accept UTF-16/32);
* ``NaN``, ``Infinity``, ``-Infinity`` and numbers that overflow to infinity (``1e999``): not JSON, and a NaN
  temperature or top-p would pass every ``<``/``>`` range check downstream;
* integers longer than ``MAX_INT_DIGITS`` digits (Python refuses to parse over 4300 anyway, slowly);
* nesting deeper than ``MAX_DEPTH``: no request of the wire format nests more than 4 levels, and the
  recursive decoder would otherwise run until Python's recursion limit;
* a key given twice in one object: ``json`` silently keeps the last, another parser the first, so a proxy and
  the server could read different requests.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32
MAX_INT_DIGITS = 40  # a 128-bit integer has 39 digits; sampling seeds and ids are far smaller
TOO_DEEP = f"invalid JSON body: nested more than {MAX_DEPTH} levels deep"


class BadJSON(ValueError):
    """A body that is not strict JSON; the message says why and where."""


def loads(body: bytes | str) -> Any:
    """``body`` as a Python value, or BadJSON (see the module docstring for what is refused)."""
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadJSON(f"invalid JSON body: not UTF-8 (byte {exc.start}: {body[exc.start:exc.start + 1]!r})") \
                from None
    else:
        text = body
    if _max_depth(text) > MAX_DEPTH:
        raise BadJSON(TOO_DEEP)
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int,
                          object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise BadJSON(f"invalid JSON body: {exc.msg} (at character {exc.pos})") from None
    except RecursionError:
        raise BadJSON(TOO_DEEP) from None


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r'[^\[\]{}]+')
_INNERMOST = re.compile(r'\[\]|\{\}')


def _max_depth(text: str) -> int:
    """Bracket depth of ``text`` outside strings (exact for valid JSON), found with C-speed regex passes.

    Strings and everything but brackets are dropped, then innermost ``[]``/``{}`` pairs are removed once per
    level: at most ``MAX_DEPTH + 1`` passes whatever the body. Brackets that do not pair up (invalid JSON) are
    left to the decoder, which reports them itself.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # cannot nest deeper than it has openers: the common case costs two scans
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = 0
    while brackets and depth <= MAX_DEPTH:
        brackets, removed = _INNERMOST.subn("", brackets)
        if not removed:
            break
        depth += 1
    return depth


def _constant(name: str) -> float:
    raise BadJSON(f"invalid JSON body: {name} is not a JSON number (numbers must be finite)")


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise BadJSON(f"invalid JSON body: {literal[:40]} overflows a float (numbers must be finite)")
    return value


def _int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise BadJSON(f"invalid JSON body: an integer of {len(literal)} digits (at most {MAX_INT_DIGITS})")
    return int(literal)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadJSON(f"invalid JSON body: key {key[:80]!r} appears twice in one object")
        out[key] = value
    return out
