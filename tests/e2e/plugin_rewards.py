"""A reward plug-in for the e2e tests, loaded by dotted path (``plugin_rewards:odd_length``).

A random tiny model never writes the right span, so exact match would give all-zero groups (all filtered
by DAPO) and no gradient. This reward has variance, so the GRPO update really runs.
"""


def odd_length(response: str, target: str, **info) -> float:
    return float(len(response) % 2)


BREVITY_CHARS = 128  # about 32 tokens of SmolLM2's English: the learning test's response budget


def brevity(response: str, target: str, **info) -> float:
    """1 - len / 128 characters, floored at 0: dense (every sample differs) and reachable (stop early)."""
    return max(0.0, 1.0 - len(response) / BREVITY_CHARS)


def neg_brevity(response: str, target: str, **info) -> float:
    """Minus ``brevity``: the learning test's negative control (the advantage sign flipped, A(-r) = -A(r))."""
    return -brevity(response, target, **info)
