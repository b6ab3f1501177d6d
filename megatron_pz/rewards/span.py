"""Span rewards: predictor exact match [PZ Eq. 8] and the adversarial generator reward [PZ Eq. 9].

Normalisation of the exact match (INFERENCE, method §6 item 10):
  * ``exact_match`` (default, "strict"): the content of the last ``\\boxed{}`` and the target are compared after
    stripping surrounding whitespace only; case, inner whitespace and punctuation must match.
  * ``exact_match_lenient``: both sides are casefolded, runs of whitespace become one space, and trailing
    ``. , ; : ! ?`` are removed before comparing.
A response without a balanced ``\\boxed{}`` scores 0.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_pz.data.parsers import extract_boxed
from megatron_pz.data.spans import word_offsets
from megatron_pz.errors import ConfigError
from megatron_pz.rewards.registry import RewardFn, get_reward
from megatron_pz.types import Sample, Status, Task

_TRAILING_PUNCT = ".,;:!?"


@dataclass
class RewardConfig:
    """Which reward functions score which task, and the generator-reward rules."""

    pred_reward: str = "exact_match"
    """Predictor / Random-RLPT reward: "exact_match" (strict), "exact_match_lenient", or a dotted path;
    "format_boxed" and "brevity" (rewards/format.py) are learnability checks, not the method.
    Resolved (imported) when the config is built, so a typo fails at start-up."""
    next_token_reward: str = "rpt_prefix"
    """RPT next-token baseline reward: "rpt_prefix" [RPT Eq. 3] or a dotted path."""
    zero_acc_rule: bool = True
    """[PZ Eq. 9] r_gen = 0 when the predictor accuracy is 0. False = the zero-mask-accuracy ablation (r_gen = 1)."""
    invalid_mask_reward: float = 0.0
    """Generator reward for a missing/invalid mask (INFERENCE, method §6 item 8: 0, and no predictor group)."""
    gen_repeat_penalty: bool = False
    """Not in the paper (a small-model deviation, docs/results.md): a valid mask's generator reward is divided by the
    number of valid masks of the step's batch (on this data owner) that name the same span, casefolded, as R-Zero's
    repetition penalty and Absolute Zero's task buffer keep a self-made curriculum diverse. Off = Eq. 9 as is."""

    def __post_init__(self) -> None:
        for name in ("pred_reward", "next_token_reward"):
            try:
                get_reward(getattr(self, name))
            except ConfigError as exc:
                raise ConfigError(f"RewardConfig.{name}: {exc}") from exc
        if not isinstance(self.zero_acc_rule, bool):
            raise ConfigError(f"RewardConfig.zero_acc_rule={self.zero_acc_rule!r}: expected true/false")
        if not isinstance(self.invalid_mask_reward, (int, float)) or isinstance(self.invalid_mask_reward, bool):
            raise ConfigError(f"RewardConfig.invalid_mask_reward={self.invalid_mask_reward!r}: expected a number")
        if not isinstance(self.gen_repeat_penalty, bool):
            raise ConfigError(f"RewardConfig.gen_repeat_penalty={self.gen_repeat_penalty!r}: expected true/false")


def normalize_strict(text: str) -> str:
    """Strict normalisation: strip surrounding whitespace only."""
    return text.strip()


def normalize_lenient(text: str) -> str:
    """Lenient normalisation: casefold, collapse whitespace, drop trailing ``.,;:!?``."""
    return " ".join(text.casefold().split()).rstrip(_TRAILING_PUNCT).rstrip()


def exact_match(response: str, target: str, **info: Any) -> float:
    """r_pred = 1[x̂ = x] on the last ``\\boxed{}``, strict normalisation [PZ Eq. 8]."""
    answer = extract_boxed(response)
    return float(answer is not None and normalize_strict(answer) == normalize_strict(target))


def exact_match_lenient(response: str, target: str, **info: Any) -> float:
    """r_pred = 1[x̂ = x] on the last ``\\boxed{}``, lenient normalisation (see module docstring)."""
    answer = extract_boxed(response)
    return float(answer is not None and normalize_lenient(answer) == normalize_lenient(target))


def continuation_answer(response: str, target: str) -> str | None:
    """The response's first k whole words as written (k = words in ``target``; ``continuation_match``), or None
    when the response has fewer words or starts with something else than a word (after whitespace)."""
    want = word_offsets(target)
    if not want or not isinstance(response, str):
        return None
    got = word_offsets(response[: 4 * len(target) + 64])  # the answer is at the start; bound the scan
    if len(got) < len(want) or response[: got[0][0]].strip():
        return None  # "(Paris" or "- Paris" is not the continuation " Paris"
    return response[got[0][0]: got[len(want) - 1][1]]


def continuation_match(response: str, target: str, **info: Any) -> float:
    """1 if the response's first k whole words, as written, equal the target's k words (strict).

    For ``prompt.pred_restate``: the prompt ends mid-sentence right before the masked span, so the answer is the
    continuation (" Paris, the capital" answers "Paris"; "Pari" or " Paris-Nord" do not). Words and their
    boundaries are the span rules' (``data.spans.word_offsets``); the text between the first and the k-th word
    is compared verbatim after stripping, so "New  York" does not match "New York". A target without words
    scores 0.
    """
    answer = continuation_answer(response, target)
    return float(answer is not None and answer == target.strip())


def generator_reward(accuracy: float | None, zero_acc_rule: bool = True, invalid_mask_reward: float = 0.0) -> float:
    """r_gen = 1 - acc, and 0 when acc = 0 unless the ablation turns the rule off [PZ Eq. 9].

    ``accuracy`` is the predictor's mean exact match over its rollouts on this mask; None = invalid mask.
    """
    if accuracy is None:
        return float(invalid_mask_reward)
    if zero_acc_rule and accuracy == 0.0:
        return 0.0
    return 1.0 - float(accuracy)


def repeat_counts(spans: Sequence[str]) -> list[int]:
    """For each span, how many of ``spans`` name it, casefolded and stripped (``gen_repeat_penalty``'s divisor)."""
    keys = [x.strip().casefold() for x in spans]
    counts = Counter(keys)
    return [counts[k] for k in keys]


def _reward_fn(task: Task, cfg: RewardConfig) -> RewardFn:
    return get_reward(cfg.next_token_reward if task is Task.NEXT_TOKEN else cfg.pred_reward)


def score_samples(samples: Sequence[Sample], cfg: RewardConfig) -> None:
    """Set ``reward`` of every generated predictor-type Sample (MASK_PRED, RANDOM_SPAN, NEXT_TOKEN).

    Samples that were not generated (PENDING/ABORTED/FILTERED) get ``reward = None``. Generator Samples are
    left alone: their reward depends on a predictor group (``assign_generator_rewards``).
    """
    for s in samples:
        if s.task is Task.MASK_GEN:
            continue
        if s.status not in (Status.COMPLETED, Status.TRUNCATED):
            s.reward = None
            continue
        info = {k: v for k, v in s.metadata.items() if k != "target"}
        s.reward = float(_reward_fn(s.task, cfg)(s.response_text, s.metadata["target"], **info))


def group_accuracies(pred_samples: Sequence[Sample]) -> dict[str, float]:
    """Mean reward per predictor group over its scored Samples (reward not None) [PZ Eq. 9 inner mean]."""
    sums: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    for s in pred_samples:
        if s.reward is not None:
            sums[s.group_id] += s.reward
            counts[s.group_id] += 1
    return {g: sums[g] / counts[g] for g in counts}


def assign_generator_rewards(
    gen_samples: Sequence[Sample], pred_samples: Sequence[Sample], cfg: RewardConfig
) -> dict[str, float]:
    """Set each generator Sample's reward from its predictor group's accuracy [PZ Eq. 9]; return metrics.

    Needs ``tasks.prediction_samples`` to have recorded the mask outcome on each generator Sample and
    ``score_samples`` to have scored the predictor Samples. Invalid masks get ``invalid_mask_reward`` (they stay
    in the generator group and so receive a negative advantage, INFERENCE method §6 item 8). A valid mask whose
    predictor rollouts all failed to generate has no accuracy: its reward stays None (not trained).
    """
    acc = group_accuracies(pred_samples)
    reasons: Counter[str] = Counter()
    accs: list[float] = []
    for s in gen_samples:
        if s.status not in (Status.COMPLETED, Status.TRUNCATED):
            s.reward = None
            continue
        if "mask_valid" not in s.metadata:
            raise ValueError(f"generator sample of group {s.group_id!r} was never parsed (tasks.prediction_samples)")
        reasons[s.metadata["mask_reason"]] += 1
        if not s.metadata["mask_valid"]:
            s.reward = generator_reward(None, cfg.zero_acc_rule, cfg.invalid_mask_reward)
            continue
        a = acc.get(s.metadata["pred_group_id"])
        s.reward = None if a is None else generator_reward(a, cfg.zero_acc_rule, cfg.invalid_mask_reward)
        if a is not None:
            accs.append(a)
    if cfg.gen_repeat_penalty:
        scored = [s for s in gen_samples if s.reward is not None and s.metadata.get("mask_valid")]
        for s, n in zip(scored, repeat_counts([str(s.metadata.get("span", "")) for s in scored])):
            s.reward = s.reward / n
    total = sum(reasons.values())
    metrics = {f"mask_reason/{r}": n / total for r, n in sorted(reasons.items())} if total else {}
    metrics["mask_valid_frac"] = reasons["valid"] / total if total else 0.0
    metrics["pred_acc_mean"] = sum(accs) / len(accs) if accs else 0.0
    metrics["pred_acc_zero_frac"] = sum(a == 0.0 for a in accs) / len(accs) if accs else 0.0
    metrics["pred_acc_one_frac"] = sum(a == 1.0 for a in accs) / len(accs) if accs else 0.0
    return metrics
