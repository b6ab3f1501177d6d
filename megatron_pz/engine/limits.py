"""The embedded server's request limits and their defaults (no heavy imports: the CLI reads them for --help).

Each is a ``ServerConfig`` field and a ``serve-rollout`` flag; docs/rollout.md ("Server limits and errors")
lists what happens when a request passes one.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_BODY_BYTES = 256 * 1024 * 1024  # a generate request with thousands of long prompts still fits
# A body must arrive within this long of its request line: a client that announces more than it sends (or
# trickles it) would otherwise hold a connection and a request slot forever.
BODY_TIMEOUT_S = 60.0
DEFAULT_MAX_N = 256  # above any GRPO group or mean@k in use here (8 and 32); SGLang has no limit
DEFAULT_MAX_PROMPT_CHARS = 1 << 20  # ~4x a 128k-token context of English text; checked before tokenising
FALLBACK_MAX_PROMPT_TOKENS = 131072  # for a model that does not say its context length


@dataclass(frozen=True)
class RequestLimits:
    """What one /generate request may ask for; checked before any tokenising or model work."""

    max_n: int = DEFAULT_MAX_N
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_prompt_tokens: int = FALLBACK_MAX_PROMPT_TOKENS
