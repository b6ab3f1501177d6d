"""Held-out metrics that can see a gain and a harm: the items, the answer layout and the end-of-answer rule.

Items: one seeded Random-span draw (``sample_random_span`` with ``RandomSpanConfig(geometric_p=1.0)``, i.e. one
whole word, the training's own draw) per paragraph of a held-out wiki split (``/work/shared/data/wiki``, split by
article, never trained on). ``random.Random(f"{seed}:{paragraph id}")`` draws the span, so a paragraph's item does
not depend on the others; a paragraph is eligible when the draw is valid, its prediction prompt has at most
``max_prompt_tokens`` tokens and the canonical answer fits the response cap; ``n`` eligible paragraphs are then
picked by one seeded shuffle (so the first 300 of a seed are inside its first 1,000) and kept in file order.

The gain metric is the expected exact-match reward at temperature 1, teacher-forced: p(span) = p(the answer's
tokens | prompt) x p(the answer ends there | prompt, answer), by the reward's own rule:

* continuation layout (``prompt.pred_restate``, ``continuation_match``): the answer is the span, preceded by a
  space when the paragraph has one there and the prompt does not already end in whitespace; it ends when the
  next token does not extend its last word (``continues_word``, the rules of ``data.spans.word_offsets``);
* paper layout (``\\boxed{span}``, ``exact_match``): the closing brace is the last answer token, p(end) = 1.

An answer that takes exactly the response cap (``rollout.pred_max_new_tokens``) tokens ends there whatever comes
next (the response is cut), so p(end) = 1; paragraphs whose answer needs more are not eligible (reward 0 whatever
the weights). Approximation: only the canonical tokenisation of the answer text is counted; other tokenisations
that decode to the same text, and other texts the reward also accepts (lenient matching, a later ``\\boxed{}``),
are left out, so p(span) is a lower bound on the expected reward. Scoring (the forwards) is ``heldout_score``.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_pz.data.prompts import ChatTemplateFn, PromptConfig, prediction_prompt
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig, sample_random_span, word_offsets
from megatron_pz.errors import ConfigError, DataError

SPLITS = ("valid", "test")
CONTINUATION_REWARDS = ("continuation_match",)
BOXED_REWARDS = ("exact_match", "exact_match_lenient")
DEFAULT_RESPONSE_CAP = 4096
"""A run's prediction response cap when its file sets none: ``TrainConfig.max_response_tokens``'s default (a test
keeps them equal; eval sits below config in the layers and cannot import it)."""
JOINERS = ("'", "’", "-")
"""Characters that join two words (``word_offsets``): a token made of one alone continues the word ("anti" "-"
"war"), the next token decides; counting it as continuing keeps p(end) a lower bound."""


def default_data_path(split: str) -> Path:
    """``<repo>/../shared/data/wiki/<split>.jsonl`` (the project's held-out wiki paragraphs)."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected one of {SPLITS}")
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wiki" / f"{split}.jsonl"


@dataclass
class Layout:
    """How a run asks for the span and scores the answer: its prompt, mask token, reward and response cap."""

    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(style="chat", pred_restate=True,
                                                                      pred_cloze=True))
    span: SpanConfig = field(default_factory=SpanConfig)
    reward: str = "continuation_match"
    max_new_tokens: int = 6
    """The prediction response cap (a run's ``rollout.pred_max_new_tokens``); the greedy decode uses it too."""

    def __post_init__(self) -> None:
        # A plug-in reward (a dotted path) scores the greedy answer; p(span) keeps the layout's rule.
        wrong, right, answer = ((BOXED_REWARDS, "continuation_match", "a continuation") if self.prompt.pred_restate
                                else (CONTINUATION_REWARDS, "exact_match", "\\boxed{span}"))
        if self.reward in wrong:
            raise ConfigError(f"held-out metrics: reward {self.reward!r} with prompt.pred_restate="
                              f"{self.prompt.pred_restate}: the answer is {answer}, use {right}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"held-out metrics: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def continuation(self) -> bool:
        return self.prompt.pred_restate

    @classmethod
    def from_run(cls, cfg: Any) -> "Layout":
        """The layout of a ``RunConfig`` (its prompt, span, reward.pred_reward and prediction response cap)."""
        return cls(prompt=cfg.prompt, span=cfg.span, reward=cfg.reward.pred_reward,
                   max_new_tokens=cfg.pred_max_new_tokens())

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": asdict(self.prompt), "mask_token": self.span.mask_token, "span_mode": self.span.mode,
                "reward": self.reward, "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class Item:
    key: str  # the paragraph's id (unique in a split)
    article: str  # the cluster of the bootstrap: "enwiki-<pageid>"
    paragraph: int  # index of the paragraph in its article
    text: str
    span: str
    prompt: str
    answer: str  # the canonical answer text appended to the prompt


def read_paragraphs(path: str | Path) -> list[dict[str, Any]]:
    """The ``{"id", "title", "text"}`` lines of a wiki split file, with ``article`` and ``paragraph`` added."""
    rows, counts = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pid, title, text = str(row["id"]), str(row.get("title", "")), row["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: expected a JSON object with 'id' and 'text' ({exc})") from None
            m = re.fullmatch(r"(.+)-(\d+)", pid)
            if m:
                article, para = m.group(1), int(m.group(2))
            else:  # ids without a paragraph number: the title is the article, paragraphs counted in file order
                article = title or pid
                para = counts.get(article, 0)
            counts[article] = para + 1
            rows.append({"id": pid, "title": title, "text": text, "article": article, "paragraph": para})
    return rows


def answer_text(layout: Layout, prompt: str, paragraph: str, position: int, span: str) -> str:
    """The answer appended to the prompt: ``\\boxed{span}``, or the span continuing the prompt as the paragraph
    does (a space before it when the paragraph has whitespace there and the prompt does not end in whitespace)."""
    if not layout.continuation:
        return "\\boxed{" + span + "}"
    glued = not prompt or prompt[-1].isspace() or (position > 0 and not paragraph[position - 1].isspace())
    return span if glued else " " + span


def draw_items(rows: Sequence[dict[str, Any]], layout: Layout, count_tokens: Callable[[str], int], n: int,
               seed: int = 0, max_prompt_tokens: int = 256, chat_template: ChatTemplateFn | None = None
               ) -> tuple[list[Item], dict[str, int]]:
    """``n`` items (fewer when fewer paragraphs are eligible) and the counts of the paragraphs left out."""
    random_cfg = RandomSpanConfig(geometric_p=1.0)
    eligible: list[Item] = []
    skipped = {"invalid_span": 0, "prompt_too_long": 0, "answer_over_cap": 0}
    for row in rows:
        res = sample_random_span(row["text"], layout.span, random_cfg, random.Random(f"{seed}:{row['id']}"))
        if not res.valid:
            skipped["invalid_span"] += 1
            continue
        prompt = prediction_prompt(res.masked_text, layout.prompt, chat_template, layout.span.mask_token)
        if count_tokens(prompt) > max_prompt_tokens:
            skipped["prompt_too_long"] += 1
            continue
        answer = answer_text(layout, prompt, row["text"], res.positions[0], res.span)
        if count_tokens(answer) > layout.max_new_tokens:
            skipped["answer_over_cap"] += 1
            continue
        eligible.append(Item(key=row["id"], article=row["article"], paragraph=row["paragraph"], text=row["text"],
                             span=res.span, prompt=prompt, answer=answer))
    order = list(range(len(eligible)))
    random.Random(seed).shuffle(order)
    return [eligible[i] for i in sorted(order[:n])], {"eligible": len(eligible), **skipped}


# ---------------------------------------------------------------- end of the answer (continuation_match)
def continues_word(piece: str) -> bool:
    """True when ``piece`` (a token's text), written right after a word, extends that word (so the answer does
    not end there): its first character is a word character, or it is a joiner (``'``, ``’``, ``-``) followed
    by one or by nothing. A piece with an undecodable byte (part of a UTF-8 character) counts as continuing;
    the empty piece (special tokens, skipped in the response text) ends the word."""
    if not piece:
        return False
    if piece[0] == "\ufffd" or piece in JOINERS:
        return True
    return word_offsets("a" + piece)[0] != (0, 1)


def end_mask(pieces: Sequence[str]) -> list[bool]:
    """Per vocabulary entry: does this token end the answer's last word (``not continues_word``)."""
    return [not continues_word(p) for p in pieces]


def expected_reward(logp_tokens: float, p_end: float, n_answer_tokens: int, max_new_tokens: int) -> float:
    """p(span) = exp(log p(answer tokens)) x p(end); an answer that fills the response cap ends there (p(end)=1)."""
    if n_answer_tokens > max_new_tokens:
        return 0.0
    return math.exp(logp_tokens) * (1.0 if n_answer_tokens == max_new_tokens else p_end)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over the per-item records: p, log p, greedy exact match; per-token NLL = sum NLL / sum tokens."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    tokens = sum(r["tokens"] for r in records)
    return {"n": n, "articles": len({r["article"] for r in records}),
            "mean_p": sum(r["p"] for r in records) / n,
            "mean_log_p": sum(r["log_p"] for r in records) / n,
            "exact": sum(r["exact"] for r in records) / n,
            "nll_per_token": sum(r["nll"] for r in records) / tokens if tokens else float("nan"),
            "mean_item_nll": sum(r["nll"] for r in records) / n, "tokens": tokens}
