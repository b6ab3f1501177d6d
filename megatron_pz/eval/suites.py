"""Evaluation suites: a registry of named suites, each a loader from a file to ``EvalItem``s plus its defaults.

Every loader takes a path (``--data PATH`` / ``EvalConfig.data``), so full benchmarks a user already has can be
pointed at; without one, the suite reads the small sample shipped in ``megatron_pz/assets/eval_sample/`` (only for
benchmarks whose licence allows redistribution, see that folder's README) or, for ``wiki_span``, the shipped
Wikipedia validation sample. Suites without a shipped sample (minerva_math, amc23, aime24) need ``--data``.

``EvalItem.prompt_text`` is the *unwrapped* user text; the runner applies the plain/chat wrapping
(``data.prompts.wrap``) so the same items serve base and chat models.

Item selection: with ``limit`` smaller than the file, ``limit`` items are drawn with ``random.Random(seed)``
(kept in file order), so small limits still cover MMLU's subjects; ``limit=None`` takes every item. Masks of the
span suites depend only on ``seed`` and the paragraph id, never on the model or the limit.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from megatron_pz.data.parsers import extract_boxed
from megatron_pz.data.prompts import PromptConfig, prediction_prompt
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig, apply_span, sample_random_span
from megatron_pz.errors import ConfigError, DataError
from megatron_pz.eval.extract import LETTERS

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Zero-shot CoT instruction of the Qwen2.5-Math evaluation (its system prompt), appended to the problem here."""
CHOICE_INSTRUCTION = ("Please reason step by step, and put the letter of the correct option (just the letter) "
                      "within \\boxed{}.")


@dataclass
class EvalItem:
    id: str
    prompt_text: str
    """The user text, not yet wrapped in a chat template."""
    target: str
    """Span text (span), final answer (math) or option letter (choice)."""
    kind: str
    """"span" | "math" | "choice" (selects the scorer in ``score.score_response``)."""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    kind: str
    loader: Callable[[Path, int], list[EvalItem]]
    """(path, seed) -> every item of the file, in file order."""
    sample: str | None
    """Shipped default data: "eval_sample/<file>" or "wiki_valid"; None = the suite needs --data."""
    max_new_tokens: int
    samples: int = 1
    """k for mean@k (AMC23 / AIME24: 32 as in the PretrainZero paper; else 1 = greedy)."""
    description: str = ""

    def default_temperature(self, samples: int) -> float:
        return 0.0 if samples == 1 else 0.6

    def default_top_p(self, samples: int) -> float:
        return 1.0 if samples == 1 else 0.95


# ------------------------------------------------------------------ file reading
def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line; DataError naming file and line on bad JSON / non-object."""
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read eval data {path}: {exc.strerror or exc}") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield lineno, rec
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl")
        if not files:
            raise DataError(f"{path}: directory holds no .jsonl file")
        return files
    if not path.exists():
        raise DataError(f"eval data not found: {path}")
    return [path]


def _field(rec: dict, names: tuple[str, ...], path: Path, lineno: int, *, types=(str,)) -> Any:
    for n in names:
        if n in rec and rec[n] is not None:
            v = rec[n]
            if not isinstance(v, types) or isinstance(v, bool):
                raise DataError(f"{path}:{lineno}: field {n!r} has type {type(v).__name__}")
            return v
    raise DataError(f"{path}:{lineno}: missing field {' / '.join(repr(n) for n in names)}")


def _span_prompt(masked: str) -> str:
    # style "plain" returns the verbatim template text; the runner wraps it.
    return prediction_prompt(masked, PromptConfig(style="plain"), mask_token=SpanConfig().mask_token)


# ------------------------------------------------------------------ span suites
def load_wiki_word(path: Path, seed: int) -> list[EvalItem]:
    """``wiki_span`` with one-word spans (``random_span.geometric_p: 1``): the span length the small-model run
    files train on (docs/coldstart.md), where wiki_span's SpanBERT lengths (mean ~4 words) are almost never
    reproduced verbatim by a 135M model."""
    return load_wiki_span(path, seed, RandomSpanConfig(geometric_p=1.0))


def load_wiki_span(path: Path, seed: int, rand_cfg: RandomSpanConfig | None = None) -> list[EvalItem]:
    """Corpus lines ``{"id", "text"}``; one seeded random whole-word span per paragraph (as the random-span
    baseline draws them in training), ``random.Random(f"{seed}:{id}")`` so masks are fixed per paragraph."""
    items: list[EvalItem] = []
    span_cfg, rand_cfg = SpanConfig(), rand_cfg or RandomSpanConfig()
    for f in _jsonl_files(path):
        for lineno, rec in iter_jsonl(f):
            text = _field(rec, ("text",), f, lineno)
            pid = str(rec.get("id", f"{f.name}:{lineno}"))
            res = sample_random_span(text, span_cfg, rand_cfg, random.Random(f"{seed}:{pid}"))
            if not res.valid:
                continue
            items.append(EvalItem(pid, _span_prompt(res.masked_text), res.span, "span",
                                  {"occurrences": len(res.positions), "title": rec.get("title", ""),
                                   "masked": res.masked_text}))
    return items


def load_squad_span(path: Path, seed: int) -> list[EvalItem]:
    """SQuAD v1.1 JSON (``data[].paragraphs[].{context, qas[].answers[0].text}``): the first human answer is the
    span, valid under training's span rules (verbatim, < 8 occurrences, all occurrences masked)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read eval data {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a SQuAD JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: not a SQuAD JSON file (no top-level 'data' list)")
    span_cfg = SpanConfig()
    items: list[EvalItem] = []
    for a, article in enumerate(doc["data"]):
        try:
            paragraphs = article["paragraphs"]
            for p, para in enumerate(paragraphs):
                context = para["context"]
                for qa in para["qas"]:
                    answers = qa.get("answers") or []
                    if not answers:
                        continue
                    res = apply_span(context, answers[0]["text"], span_cfg)
                    if not res.valid:
                        continue
                    items.append(EvalItem(str(qa["id"]), _span_prompt(res.masked_text), res.span, "span",
                                          {"title": article.get("title", ""), "question": qa.get("question", ""),
                                           "occurrences": len(res.positions),
                                           "masked": res.masked_text}))
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: data[{a}] is not a SQuAD article (missing/invalid {exc})") from None
    return items


# ------------------------------------------------------------------ math suites
def _math_prompt(problem: str) -> str:
    return problem.strip() + "\n" + MATH_INSTRUCTION


def _answer_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def load_math(path: Path, seed: int) -> list[EvalItem]:
    """Math JSONL in any of the usual layouts: problem/question + answer (MATH-500, AMC23, AIME24), GSM8K's
    ``#### x`` answers, Minerva's ``\\boxed{}`` solutions, OlympiadBench's ``final_answer`` lists."""
    items: list[EvalItem] = []
    for f in _jsonl_files(path):
        for lineno, rec in iter_jsonl(f):
            problem = _field(rec, ("problem", "question"), f, lineno)
            meta: dict[str, Any] = {}
            if rec.get("final_answer") is not None:  # OlympiadBench
                fa = rec["final_answer"]
                fa = fa if isinstance(fa, list) else [fa]
                target = ", ".join(str(x).strip().strip("$") for x in fa)
                if rec.get("unit"):
                    meta["unit"] = rec["unit"]
            elif rec.get("answer") is not None:
                ans = rec["answer"]
                if not isinstance(ans, (str, int, float)) or isinstance(ans, bool):
                    raise DataError(f"{f}:{lineno}: field 'answer' has type {type(ans).__name__}")
                if isinstance(ans, str) and "####" in ans:  # GSM8K worked solution
                    ans = ans.rsplit("####", 1)[1].strip().replace(",", "")
                target = _answer_str(ans)
            elif isinstance(rec.get("solution"), str) and extract_boxed(rec["solution"]) is not None:  # Minerva
                target = extract_boxed(rec["solution"])
            else:
                raise DataError(f"{f}:{lineno}: no gold answer (expected 'answer', 'final_answer', or a "
                                f"'solution' with \\boxed{{}})")
            if not target:
                raise DataError(f"{f}:{lineno}: empty gold answer")
            rid = rec.get("unique_id", rec.get("id", rec.get("idx", f"{f.name}:{lineno}")))
            items.append(EvalItem(str(rid), _math_prompt(problem), target, "math", meta))
    return items


# ------------------------------------------------------------------ multiple choice
def _choice_prompt(question: str, options: list[str]) -> str:
    lines = [f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options)]
    return ("Answer the following multiple choice question.\n\n" + question.strip() + "\n\n" + "\n".join(lines)
            + "\n\n" + CHOICE_INSTRUCTION)


def _parse_embedded_options(question: str) -> tuple[str, list[str]] | None:
    """SuperGPQA sample layout: ``"<stem>\\n Options are:\\nA. ...\\nB. ..."`` -> (stem, options)."""
    marker = question.rfind("Options are:")
    if marker < 0:
        return None
    stem, body = question[:marker].rstrip(), question[marker + len("Options are:"):]
    options: list[str] = []
    for line in body.split("\n"):
        head = line[:3]
        if len(options) < len(LETTERS) and head[:2] == f"{LETTERS[len(options)]}.":
            options.append(line[2:].strip())
        elif options:
            options[-1] += "\n" + line
    return (stem, [o.strip() for o in options]) if len(options) >= 2 else None


def load_choice(path: Path, seed: int) -> list[EvalItem]:
    """Multiple-choice JSONL: ``question`` + ``choices``/``options`` list + ``answer`` letter or ``answer_index``
    (MMLU, MMLU-Pro, full SuperGPQA with ``answer_letter``), or the SuperGPQA sample's options embedded in the
    question and ``answer`` "<letter>. <text>"."""
    items: list[EvalItem] = []
    for f in _jsonl_files(path):
        for lineno, rec in iter_jsonl(f):
            question = _field(rec, ("question",), f, lineno)
            options = rec.get("options", rec.get("choices"))
            if options is None:
                parsed = _parse_embedded_options(question)
                if parsed is None:
                    raise DataError(f"{f}:{lineno}: no 'options'/'choices' list and no 'Options are:' block")
                question, options = parsed
            if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
                raise DataError(f"{f}:{lineno}: 'options' must be a list of 2..{len(LETTERS)} strings")
            letter = rec.get("answer_letter")
            if letter is None:
                ans = rec.get("answer")
                if isinstance(ans, str) and ans.strip()[:1] in LETTERS and (
                        len(ans.strip()) == 1 or ans.strip()[1:2] in ".):"):
                    letter = ans.strip()[0]
                elif isinstance(rec.get("answer_index"), int):
                    letter = LETTERS[rec["answer_index"]] if 0 <= rec["answer_index"] < len(LETTERS) else None
                elif isinstance(ans, str) and ans in options:
                    letter = LETTERS[options.index(ans)]
            if not isinstance(letter, str) or letter not in LETTERS[: len(options)]:
                raise DataError(f"{f}:{lineno}: no valid answer letter for {len(options)} options "
                                f"(answer={str(rec.get('answer'))[:40]!r})")
            rid = rec.get("question_id", rec.get("id", rec.get("uuid", f"{f.name}:{lineno}")))
            meta = {"num_options": len(options)}
            for k in ("subject", "category", "discipline"):
                if rec.get(k):
                    meta[k] = rec[k]
            items.append(EvalItem(str(rid), _choice_prompt(question, options), letter, "choice", meta))
    return items


# ------------------------------------------------------------------ registry
SUITES: dict[str, SuiteSpec] = {s.name: s for s in [
    SuiteSpec("wiki_span", "span", load_wiki_span, "wiki_valid", 256,
              description="held-out Wikipedia paragraphs, seeded random whole-word span, exact match"),
    SuiteSpec("wiki_word", "span", load_wiki_word, "wiki_valid", 256,
              description="wiki_span with one-word spans (the small-model training span)"),
    SuiteSpec("squad_span", "span", load_squad_span, "eval_sample/squad_span.json", 256,
              description="SQuAD v1.1 dev contexts, first human answer masked, exact match"),
    SuiteSpec("gsm8k", "math", load_math, "eval_sample/gsm8k.jsonl", 512, description="GSM8K test"),
    SuiteSpec("math500", "math", load_math, "eval_sample/math500.jsonl", 1024, description="MATH-500"),
    SuiteSpec("minerva_math", "math", load_math, None, 1024, description="Minerva Math (OCW), needs --data"),
    SuiteSpec("olympiadbench", "math", load_math, "eval_sample/olympiadbench.jsonl", 1024,
              description="OlympiadBench (English, text-only maths)"),
    SuiteSpec("amc23", "math", load_math, None, 2048, samples=32, description="AMC 2023, mean@32, needs --data"),
    SuiteSpec("aime24", "math", load_math, None, 2048, samples=32, description="AIME 2024, mean@32, needs --data"),
    SuiteSpec("mmlu", "choice", load_choice, "eval_sample/mmlu.jsonl", 512, description="MMLU test"),
    SuiteSpec("mmlu_pro", "choice", load_choice, "eval_sample/mmlu_pro.jsonl", 1024, description="MMLU-Pro test"),
    SuiteSpec("supergpqa", "choice", load_choice, "eval_sample/supergpqa.jsonl", 1024,
              description="SuperGPQA (shipped: part of a 300-question third-party sample; not comparable)"),
]}


def get_suite(name: str) -> SuiteSpec:
    if name not in SUITES:
        raise ConfigError(f"unknown eval suite {name!r}; expected one of {', '.join(SUITES)}")
    return SUITES[name]


def parse_suites(value: str | list[str]) -> list[str]:
    """"a,b" or ["a", "b"] -> validated names (duplicates dropped, order kept)."""
    names = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for n in (str(x).strip() for x in names):
        if not n:
            continue
        get_suite(n)
        if n not in out:
            out.append(n)
    if not out:
        raise ConfigError("no eval suite given")
    return out


def assets_root() -> Path:
    return Path(str(resources.files("megatron_pz") / "assets"))


def default_data_path(name: str) -> Path:
    spec = get_suite(name)
    if spec.sample is None:
        raise ConfigError(f"suite {name!r} ships no sample data (licence): pass --data PATH (eval.data.{name}) to "
                          f"your copy of the benchmark")
    if spec.sample == "wiki_valid":
        return assets_root() / "wiki_sample" / "valid"
    return assets_root() / spec.sample


def select(items: list[EvalItem], limit: int | None, seed: int) -> list[EvalItem]:
    """``limit`` items drawn with ``random.Random(seed)`` and kept in file order (all when limit is None/large)."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def load_suite(name: str, path: str | Path | None = None, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """Items of suite ``name`` from ``path`` (default: the shipped sample), ``limit`` of them chosen by ``seed``."""
    spec = get_suite(name)
    if limit is not None and limit < 1:
        raise ConfigError(f"eval limit must be >= 1, got {limit}")
    p = Path(path) if path is not None else default_data_path(name)
    if not p.exists():
        raise DataError(f"eval data for suite {name!r} not found: {p}")
    items = spec.loader(p, seed)
    if not items:
        raise DataError(f"{p}: no usable item for suite {name!r}")
    return select(items, limit, seed)
