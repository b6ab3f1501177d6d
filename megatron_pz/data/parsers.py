"""Extract the answer of a model output: the content of the last balanced ``\\mask{...}`` or ``\\boxed{...}``.

Rules (INFERENCE, method §6 items 10 and 12: "take the content of the last ``\\boxed{}``"):

* A command is the literal text ``\\<name>{`` (no space allowed before ``{``). Its content runs to the brace
  that balances that ``{``; nested ``{...}`` inside the content are allowed and kept.
* "Last" means the command whose ``\\<name>{`` *starts* last among those whose brace is balanced. So in
  ``\\boxed{a \\boxed{b}}`` the answer is ``b`` (the usual MATH-eval convention), and in ``\\boxed{a} \\boxed{b``
  (unterminated tail) the answer is ``a``.
* Escapes: a backslash escapes the character after it, so ``\\{`` and ``\\}`` are literal braces that do not
  count for balancing, and ``\\\\{`` is an escaped backslash followed by a real brace. The content is returned
  verbatim: escapes are *not* removed (``\\boxed{\\{x\\}}`` gives ``\\{x\\}``).
* Absent or unterminated commands give ``None``. Nothing is stripped here; normalisation belongs to the reward.

The scanner is a single left-to-right pass with a stack of open-brace positions, so it is linear in the length
of the output and never backtracks; megabyte-long adversarial outputs are fine.
"""
from __future__ import annotations

import re

# One token per escape pair or brace. Alternation of fixed-width atoms: no backtracking is possible.
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


def find_last_command(text: str, name: str) -> tuple[int, int] | None:
    """Return ``(start, end)`` of the content of the last balanced ``\\<name>{...}`` in ``text``, or None.

    ``text[start:end]`` is the content between the braces. Linear time in ``len(text)``.
    """
    if not isinstance(text, str) or not text:
        return None
    opener = "\\" + name + "{"
    # Positions of the '{' of every command occurrence (str.find is linear; occurrences cannot overlap
    # because the opener starts with a backslash and contains no other backslash).
    command_braces: set[int] = set()
    pos = text.find(opener)
    while pos != -1:
        command_braces.add(pos + len(opener) - 1)
        pos = text.find(opener, pos + len(opener))
    if not command_braces:
        return None
    best: tuple[int, int] | None = None
    stack: list[int] = []
    for match in _BRACE_OR_ESCAPE.finditer(text):
        token = match.group()
        if token == "{":
            stack.append(match.start())
        elif token == "}":
            if stack:  # an unmatched '}' is ignored: it closes nothing
                open_pos = stack.pop()
                if open_pos in command_braces and (best is None or open_pos + 1 > best[0]):
                    best = (open_pos + 1, match.start())
        # escape pairs ("\{", "\}", "\\", "\x") are skipped: they never open or close anything
    return best


def extract_last_command(text: str, name: str) -> str | None:
    """Content of the last balanced ``\\<name>{...}`` in ``text`` (verbatim), or None if there is none."""
    found = find_last_command(text, name)
    return None if found is None else text[found[0] : found[1]]


def extract_mask(text: str) -> str | None:
    """The generator's span: content of the last ``\\mask{...}`` [PZ Fig. 5], or None."""
    return extract_last_command(text, "mask")


def extract_boxed(text: str) -> str | None:
    """The predictor's answer: content of the last ``\\boxed{...}`` [PZ Fig. 5], or None."""
    return extract_last_command(text, "boxed")


def extract_boxed_after_think(text: str, think_end: str = "</think>") -> str | None:
    """RPT convention: the last ``\\boxed{}`` after ``</think>`` [RPT §2]; the whole text if no ``</think>``."""
    cut = text.rfind(think_end) if isinstance(text, str) else -1
    return extract_boxed(text if cut < 0 else text[cut + len(think_end) :])
