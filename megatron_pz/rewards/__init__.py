"""Rewards: plain callables ``fn(response, target, **info) -> float`` behind a name/dotted-path registry."""
