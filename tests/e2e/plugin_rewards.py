"""A reward plug-in for the e2e tests, loaded by dotted path (``plugin_rewards:odd_length``).

A random tiny model never writes the right span, so exact match would give all-zero groups (all filtered
by DAPO) and no gradient. This reward has variance, so the GRPO update really runs.
"""


def odd_length(response: str, target: str, **info) -> float:
    return float(len(response) % 2)



def neg_brevity(response: str, target: str, **info) -> float:
    """Minus ``brevity``: the learning test's negative control (the advantage sign flipped, A(-r) = -A(r))."""
    from megatron_pz.rewards.format import brevity

    return -brevity(response, target, **info)


def one_in_three(response: str, target: str, **info) -> float:
    """1 when the response's length in characters is a multiple of 3: about a third of random responses, so some
    masks' 4 predictions all score 0 (accuracy 0, PretrainZero Eq. 9's zero rule) and others do not."""
    return float(len(response) % 3 == 0)


def nan_reward(response: str, target: str, **info) -> float:
    """NaN for every answer: the GRPO advantages, the loss and the gradients become NaN (the non-finite guard)."""
    return float("nan")
