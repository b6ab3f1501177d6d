"""Run evaluation suites through any ``RolloutEngine`` (embedded, SGLang client or pool).

``run_suite`` loads a suite's items, wraps and tokenizes the prompts, generates k samples per item, scores every
response and returns a ``SuiteResult`` (metrics + per-item records). ``evaluate`` runs the suites of an
``EvalConfig`` and returns only the metrics (what the training loop logs).

Defaults per suite (``suites.SUITES``): k = 1 greedy except AMC23/AIME24 (k = 32 at temperature 0.6, top_p 0.95,
the PretrainZero paper's mean@32); everything is overridable. Items whose prompt plus ``max_new_tokens`` do not
fit the engine's context window are skipped and counted (``skipped_too_long``), never silently truncated.
``SuiteResult.config["checker"]`` names what scored the responses: for maths suites "math-verify 0.9.0" or "light
checker" (``answers``; both, with counts, if Math-Verify stopped working mid-suite), and the maths metrics count
``checker_timeouts`` (answers Math-Verify gave no verdict on in time, scored wrong).
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_pz.data.prompts import PROMPT_STYLES, ChatTemplateFn, PromptConfig, prediction_prompt, wrap
from megatron_pz.data.spans import SpanConfig
from megatron_pz.errors import ConfigError
from megatron_pz.eval import answers
from megatron_pz.eval.score import mean_at_k, mean_pass_at_k, score_response
from megatron_pz.eval.suites import SUITES, EvalItem, get_suite, load_suite, parse_suites
from megatron_pz.rollout.protocol import SamplingParams

logger = logging.getLogger(__name__)

BATCH_PROMPTS = 32
"""Prompts per ``generate`` call (progress is logged after each)."""


@dataclass
class EvalConfig:
    """Periodic evaluation during training; the run file's ``eval:`` section."""

    interval: int = 0
    """Steps between evaluations during training; 0 = off."""
    suites: list[str] = field(default_factory=lambda: ["wiki_span"])
    """Suite names (``megatron_pz.eval.suites.SUITES``)."""
    limit: int = 64
    """Items per suite (drawn with ``seed``, the same items every time)."""
    max_new_tokens: int = 256
    samples: int | None = None
    """k for mean@k; None = the suite's default (1, or 32 for amc23/aime24)."""
    temperature: float | None = None
    """None = the suite's default (0 for k = 1, else 0.6)."""
    seed: int = 0
    """Picks the items, the span masks and the sampling seed."""
    at_start: bool = True
    """Also evaluate the initial weights (step 0)."""
    data: dict[str, str] = field(default_factory=dict)
    """suite -> data path override (required for suites that ship no sample: minerva_math, amc23, aime24)."""
    harness: list[str] = field(default_factory=list)
    """lm-evaluation-harness task names (``eval/harness.py``), run on the rollout server's ``/v1/completions``
    with ``limit`` documents each; logged as ``eval/<task>/<metric>``. Needs the ``[eval]`` extra."""
    harness_include: list[str] = field(default_factory=list)
    """Folders of task YAMLs besides the shipped ``megatron_pz/assets/harness``."""

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"EvalConfig.{name}={getattr(self, name)!r}: expected {want}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.interval) or self.interval < 0:
            raise bad("interval", "an int >= 0")
        if isinstance(self.suites, str):
            self.suites = [s for s in self.suites.split(",") if s.strip()]
        if isinstance(self.harness, str):
            self.harness = [t.strip() for t in self.harness.split(",") if t.strip()]
        for name in ("harness", "harness_include"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise bad(name, "a list of names" if name == "harness" else "a list of folders")
        if not isinstance(self.suites, list) or not (self.suites or self.harness):
            raise bad("suites", "a non-empty list of suite names (or eval.harness tasks)")
        try:
            self.suites = parse_suites(self.suites) if self.suites else []
        except ConfigError as exc:
            raise ConfigError(f"EvalConfig.suites: {exc}") from None
        if not is_int(self.limit) or self.limit < 1:
            raise bad("limit", "an int >= 1")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an int >= 1")
        if self.samples is not None and (not is_int(self.samples) or self.samples < 1):
            raise bad("samples", "null or an int >= 1")
        if self.temperature is not None and (
                not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise bad("temperature", "null or a number >= 0")
        if not is_int(self.seed):
            raise bad("seed", "an int")
        if not isinstance(self.at_start, bool):
            raise bad("at_start", "true/false")
        if not isinstance(self.data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in self.data.items()):
            raise bad("data", "a mapping suite -> path")
        unknown = [k for k in self.data if k not in SUITES]
        if unknown:
            raise ConfigError(f"EvalConfig.data: unknown suite {unknown[0]!r}; expected one of {', '.join(SUITES)}")
        for s in self.suites:
            if get_suite(s).sample is None and s not in self.data:
                raise ConfigError(f"EvalConfig.suites: {s!r} ships no data; set eval.data.{s} to its file")


@dataclass
class SuiteResult:
    suite: str
    config: dict[str, Any]
    metrics: dict[str, float]
    records: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _engine_max_positions(engine: Any) -> int | None:
    v = getattr(engine, "max_positions", None)
    return int(v) if isinstance(v, int) and v > 0 else None


RULES = {"span": "exact match of the span (rewards/span.py)", "choice": "option letter (extract.extract_choice)"}
"""What scores the non-maths suites (the report's "checker")."""


def describe_checkers(kind: str, used: Counter) -> str:
    """The report's "checker" of a suite: its rule, or the maths checker(s) that scored its responses."""
    if kind != "math":
        return RULES[kind]
    if not used:
        return answers.checker_label()
    if len(used) == 1:
        return next(iter(used))
    return ", ".join(f"{name} ({n} responses)" for name, n in used.most_common())


def run_suite(engine: Any, encode: Callable[[str], list[int]], chat_template: ChatTemplateFn | None, suite: str,
              *, limit: int | None = None, samples: int | None = None, temperature: float | None = None,
              top_p: float | None = None, max_new_tokens: int | None = None, seed: int = 0,
              data_path: str | None = None, prompt_style: str = "chat", restate: bool = False,
              cloze: bool = False, progress: Callable[[str], None] | None = None) -> SuiteResult:
    """Evaluate one suite; None arguments take the suite's defaults (recorded in ``SuiteResult.config``).

    ``restate`` (span suites; the run's ``prompt.pred_restate``): the response starts with the masked sentence
    up to its first mask, and the answer is the continuation, as in training; ``cloze`` (the run's
    ``prompt.pred_cloze``) renders that prompt as plain text."""
    spec = get_suite(suite)
    restate = restate and spec.kind == "span"  # only span suites have a sentence to restate
    if prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"prompt style {prompt_style!r}: expected one of {PROMPT_STYLES}")
    k = spec.samples if samples is None else int(samples)
    temp = spec.default_temperature(k) if temperature is None else float(temperature)
    top_p = (spec.default_top_p(k) if temp > 0 else 1.0) if top_p is None else float(top_p)
    max_new = spec.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if k > 1 and temp == 0:
        logger.warning("%s: %d samples at temperature 0 are identical (greedy); mean@k = accuracy", suite, k)
    params = SamplingParams(n=k, max_new_tokens=max_new, temperature=temp, top_p=top_p, seed=seed)
    items = load_suite(suite, data_path, limit, seed)
    pcfg = PromptConfig(style=prompt_style, pred_restate=restate, pred_cloze=cloze and restate)
    max_pos = _engine_max_positions(engine)
    prompts: list[tuple[EvalItem, str, list[int]]] = []
    skipped = 0
    for it in items:
        # A restated span prompt is training's own prediction prompt, rebuilt from the masked paragraph.
        text = (prediction_prompt(it.metadata["masked"], pcfg, chat_template, SpanConfig().mask_token) if restate
                else wrap(it.prompt_text, pcfg, chat_template))
        ids = list(encode(text))
        if max_pos is not None and len(ids) + max_new > max_pos:
            skipped += 1
            continue
        prompts.append((it, text, ids))
    if skipped:
        logger.warning("%s: skipped %d item(s) whose prompt + %d new tokens exceed the context (%d)", suite,
                       skipped, max_new, max_pos)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    correct: list[list[bool]] = []
    lenient: list[list[bool]] = []
    tokens: list[int] = []
    truncated = no_answer = 0
    checkers: Counter = Counter()
    timeouts_before = answers.worker().timeouts if spec.kind == "math" else 0
    for start in range(0, len(prompts), BATCH_PROMPTS):
        chunk = prompts[start: start + BATCH_PROMPTS]
        results = engine.generate([ids for _, _, ids in chunk], params)
        for (it, text, ids), res in zip(chunk, results):
            responses = []
            for r in res:
                resp = r.text or ""
                sc = score_response(it.kind, resp, it.target, it.metadata, restate)
                responses.append({"response": resp, "extracted": sc.extracted, "correct": sc.correct,
                                  "lenient_correct": sc.lenient, "tokens": len(r.response_ids),
                                  "finish_reason": r.finish_reason})
                tokens.append(len(r.response_ids))
                truncated += r.finish_reason == "length"
                no_answer += sc.extracted is None
                if sc.checker:
                    checkers[sc.checker] += 1
            correct.append([x["correct"] for x in responses])
            lenient.append([x["lenient_correct"] for x in responses])
            records.append({"id": it.id, "prompt": text, "target": it.target, "metadata": it.metadata,
                            "prompt_tokens": len(ids), "responses": responses,
                            "accuracy": mean_at_k([correct[-1]])})
        msg = f"{suite}: {min(start + BATCH_PROMPTS, len(prompts))}/{len(prompts)} items, " \
              f"accuracy so far {mean_at_k(correct):.3f}"
        logger.info(msg)
        if progress:
            progress(msg)
    n_resp = max(1, len(tokens))
    metrics: dict[str, float] = {
        "accuracy": mean_at_k(correct),
        "n": len(records),
        "samples": k,
        "mean_response_tokens": sum(tokens) / n_resp,
        "truncated_rate": truncated / n_resp,
        "no_answer_rate": no_answer / n_resp,
        "skipped_too_long": skipped,
        "seconds": time.perf_counter() - t0,
    }
    if spec.kind == "span":
        metrics["lenient_accuracy"] = mean_at_k(lenient)
    if spec.kind == "math":
        metrics["checker_timeouts"] = answers.worker().timeouts - timeouts_before
    if k > 1 and records:
        metrics[f"pass@{k}"] = mean_pass_at_k(correct, k)
        metrics["pass@1"] = mean_pass_at_k(correct, 1)
    config = {"suite": suite, "kind": spec.kind, "data": str(data_path) if data_path else f"(shipped) {spec.sample}",
              "limit": limit, "samples": k, "temperature": temp, "top_p": top_p, "max_new_tokens": max_new,
              "seed": seed, "prompt_style": prompt_style, "chat_template": chat_template is not None,
              "restate": restate, "cloze": pcfg.pred_cloze, "checker": describe_checkers(spec.kind, checkers)}
    return SuiteResult(suite, config, metrics, records)


def evaluate(engine: Any, encode: Callable[[str], list[int]], chat_template: ChatTemplateFn | None, cfg: EvalConfig,
             prompt_style: str = "chat", restate: bool = False, cloze: bool = False) -> dict[str, dict[str, float]]:
    """Run every suite of ``cfg``; returns ``{suite: metrics}`` (accuracy, lenient_accuracy for spans, n, ...)."""
    out: dict[str, dict[str, float]] = {}
    for suite in cfg.suites:
        res = run_suite(engine, encode, chat_template, suite, limit=cfg.limit, samples=cfg.samples,
                        temperature=cfg.temperature, top_p=None, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        data_path=cfg.data.get(suite), prompt_style=prompt_style, restate=restate,
                        cloze=cloze)
        out[suite] = res.metrics
    return out


def flat_metrics(results: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<suite>/<metric>": value}`` for a metrics logger."""
    return {f"{prefix}/{s}/{k}": float(v) for s, m in results.items() for k, v in m.items()}
