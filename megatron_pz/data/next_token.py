"""RPT next-token reasoning samples [PZ §3.1 "Entropy-based Next Token Reasoning"; RPT §2-3]. Pure functions.

A paragraph is truncated at a high-entropy token position t; the policy sees the context (tokens < t) in the RPT
prompt and must put the next token(s) in ``\\boxed{}``; the byte-prefix reward (``rewards/rpt.py``) compares the
answer with the true continuation. The pieces, in the order ``trainer/collect.py`` uses them:

* ``topk_entropy``: a position's entropy from the top-K log-probs the rollout engine returns for the paragraph's
  input tokens (SGLang's ``input_top_logprobs``) [RPT §3.2: entropy over the top-16 next tokens];
* ``token_byte_ends``: each token's cumulative UTF-8 byte end, from the tokenizer's decode alone;
* ``select_entropy_positions``: a seeded draw among the top-``top_entropy_frac`` entropy positions;
* ``next_token_samples``: one GRPO group of ``n`` Samples per drawn position.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_pz.data import prompts
from megatron_pz.data.corpus import Paragraph
from megatron_pz.errors import ConfigError
from megatron_pz.types import Sample, Task


@dataclass
class NextTokenConfig:
    """The ``rpt`` section: where to truncate a paragraph (INFERENCE, method §6 item 14).

    How many positions per paragraph and how many answers per position are the batch layout, in ``train``:
    ``train.masks_per_paragraph`` and ``train.predictions_per_mask``.
    """

    top_entropy_frac: float = 0.2
    """Candidates are the positions in the top fraction of the sequence's entropies [PZ §3.1: "top 20%"]."""
    entropy_top_k: int = 16
    """Log-probs per position the entropy is computed from (SGLang ``top_logprobs_num``) [RPT §3.2: top-16]."""
    min_context_tokens: int = 8
    """Never truncate before this many context tokens."""
    max_target_tokens: int = 32
    """The stored ground-truth continuation is cut after this many tokens (the reward only needs a prefix)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.top_entropy_frac <= 1.0:
            raise ConfigError(f"rpt.top_entropy_frac={self.top_entropy_frac!r}: expected 0 < f <= 1")
        for name in ("entropy_top_k", "min_context_tokens", "max_target_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"rpt.{name}={value!r}: expected an int >= 1")


def topk_entropy(top_logprobs: Sequence[float]) -> float:
    """Entropy (nats) of the top-K distribution renormalised to sum to 1: ``-sum q log q``, ``q = p / sum p``.

    ``top_logprobs`` are the K largest log-probs of one position (any order). The tail outside the top K is
    dropped, as RPT's "entropy over the top-16 next tokens" does; with K = vocabulary size this is the exact
    entropy. NaN for an empty list (no distribution, e.g. the first token of a sequence).
    """
    if not top_logprobs:
        return math.nan
    m = max(top_logprobs)
    weights = [math.exp(lp - m) for lp in top_logprobs]
    total = sum(weights)
    return -sum(w / total * (lp - m - math.log(total)) for w, lp in zip(weights, top_logprobs) if w > 0)


def token_byte_ends(text: str, ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """Cumulative UTF-8 byte end of each token of ``ids`` (an encoding of ``text``), found with ``decode`` only.

    The end of token j is the byte length of ``decode(ids[:j+1])`` when that is a prefix of ``text``. A token
    ending inside a multi-byte character (byte-level BPE splits one) decodes to the complete characters plus
    U+FFFD; its end is put one byte into the next character (or one byte after the previous end, if larger):
    not the exact byte, but inside the same character, which is all that matters here, since a boundary inside
    a character is never a truncation point (``next_token_samples`` skips it) and never matches a prediction (a
    prediction is whole characters). ValueError if the ids do not decode to ``text`` or the ends cannot be
    placed strictly increasing.
    """
    data = text.encode("utf-8")
    if decode(list(ids)) != text:
        raise ValueError("the token ids do not decode to the text")
    ends: list[int] = []
    for j in range(len(ids)):
        prev = ends[-1] if ends else 0
        prefix = decode(list(ids[: j + 1]))
        whole = prefix.rstrip("\ufffd")
        if whole == prefix and text.startswith(prefix):
            end = len(prefix.encode("utf-8"))
        elif whole != prefix and text.startswith(whole):
            end = max(prev + 1, len(whole.encode("utf-8")) + 1)
        else:
            end = prev + 1
        ends.append(end)
    if any(b <= a for a, b in zip([0] + ends[:-1], ends)) or (ends and ends[-1] != len(data)):
        raise ValueError(f"cannot place the token byte ends of {text[:40]!r} strictly increasing: {ends}")
    return ends


def select_entropy_positions(
    entropies: Sequence[float],
    k: int,
    cfg: NextTokenConfig,
    rng: random.Random,
    eligible: Sequence[bool] | None = None,
) -> list[int]:
    """Up to ``k`` truncation positions among the top-``top_entropy_frac`` entropy tokens [PZ §3.1, RPT §3.2].

    ``entropies[t]`` is the entropy of the model's distribution for token ``t`` given tokens ``< t`` (so index
    0, which has no context, is never a candidate). The top ``ceil(frac * (T - 1))`` positions of ``1..T-1`` are
    ranked by entropy (ties: earlier position first; NaN counts as lowest); of those, positions that are
    ``>= min_context_tokens`` and ``eligible`` (default: all) are candidates, and up to ``k`` of them are drawn
    without replacement. Returned sorted.
    """
    T = len(entropies)
    if T < 2:
        return []
    key = [(-e if e == e else math.inf) for e in map(float, entropies)]  # e == e is False for NaN
    ranked = sorted(range(1, T), key=lambda t: (key[t], t))
    top = ranked[: math.ceil(cfg.top_entropy_frac * (T - 1))]
    candidates = [
        t for t in top if t >= cfg.min_context_tokens and (eligible is None or eligible[t]) and key[t] != math.inf
    ]
    return sorted(rng.sample(candidates, min(k, len(candidates))))


def next_token_samples(
    paragraph: Paragraph,
    token_byte_ends: Sequence[int],
    entropies: Sequence[float],
    group_prefix: str,
    positions: int,
    n: int,
    cfg: NextTokenConfig,
    prompt_cfg: prompts.PromptConfig,
    rng: random.Random,
    chat_template: prompts.ChatTemplateFn | None = None,
) -> list[Sample]:
    """RPT next-token-reasoning Samples: truncate at high-entropy positions, target = the continuation [RPT §2].

    ``token_byte_ends[j]`` is the cumulative UTF-8 byte length of the paragraph's tokens ``0..j`` (strictly
    increasing, last = byte length of the text); ``entropies`` has one value per token (see
    ``select_entropy_positions``, which draws up to ``positions`` of them). Positions whose context would end inside
    a UTF-8 character are skipped. One group of ``n`` Samples per chosen position,
    ``group_id = f"{group_prefix}/pos{t}"``. Metadata carries ``target`` (continuation text, at most
    ``max_target_tokens`` tokens), ``gt_token_byte_ends`` (token ends within the target, for the RPT Eq. 3
    reward) and ``entropy`` (of the chosen position).
    """
    data = paragraph.text.encode("utf-8")
    ends = list(token_byte_ends)
    if len(ends) != len(entropies):
        raise ValueError(f"token_byte_ends ({len(ends)}) and entropies ({len(entropies)}) differ in length")
    if ends and (ends[-1] != len(data) or any(b <= a for a, b in zip([0] + ends[:-1], ends, strict=True))):
        raise ValueError("token_byte_ends must be strictly increasing and end at the text's byte length")

    def starts_char(t: int) -> bool:  # the context data[:ends[t-1]] ends on a UTF-8 character boundary
        return t >= 1 and (ends[t - 1] >= len(data) or (data[ends[t - 1]] & 0xC0) != 0x80)

    eligible = [starts_char(t) for t in range(len(ends))]
    samples: list[Sample] = []
    for t in select_entropy_positions(entropies, positions, cfg, rng, eligible):
        cut = ends[t - 1]
        last = min(len(ends), t + cfg.max_target_tokens) - 1
        target = data[cut : ends[last]].decode("utf-8", errors="ignore")
        gt_ends = [e - cut for e in ends[t : last + 1] if e - cut <= len(target.encode("utf-8"))]
        context = data[:cut].decode("utf-8")
        text = prompts.next_token_prompt(context, prompt_cfg, chat_template)
        samples += [
            Sample(
                task=Task.NEXT_TOKEN,
                group_id=f"{group_prefix}/pos{t}",
                prompt_text=text,
                metadata={
                    "paragraph_id": paragraph.id,
                    "title": paragraph.title,
                    "position": t,
                    "entropy": float(entropies[t]),
                    "context": context,
                    "target": target,
                    "gt_token_byte_ends": gt_ends,
                    "index": i,
                },
            )
            for i in range(n)
        ]
    return samples
