"""The experiment's negative control, loaded by dotted path (``control_rewards:neg_continuation_match``).

GRPO advantages are odd in the reward (A(-r) = -A(r) within a group), so a Random-span run on minus the reward is
the same run with the learning signal's sign flipped: whatever it does to held-out p(span) is what training does
without the reward's direction (docs/results.md, the flipped control).
"""
from megatron_pz.rewards.span import continuation_match


def neg_continuation_match(response: str, target: str, **info) -> float:
    return -continuation_match(response, target, **info)
