#!/usr/bin/env python3
"""Print N generation prompts, prediction prompts and Random-RLPT prompts from a corpus, for eyeballing.

There is no model here, so the "generator output" for each paragraph is simulated: a random whole-word span
that passes the span rules is wrapped as ``\\mask{...}``, parsed back and masked exactly as a real generator
output would be. Runs with no arguments on the shipped Wikipedia sample:

    python tools/preview_tasks.py --n 3 [--corpus PATH] [--template plain|chat] [--seed S] [--span-mode MODE]
"""
from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

try:
    import megatron_pz  # noqa: F401
except ModuleNotFoundError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_pz.data import tasks  # noqa: E402
from megatron_pz.data.corpus import CorpusConfig, CorpusReader  # noqa: E402
from megatron_pz.data.prompts import PromptConfig  # noqa: E402
from megatron_pz.data.spans import SPAN_MODES, RandomSpanConfig, SpanConfig, sample_random_span  # noqa: E402
from megatron_pz.errors import UserError  # noqa: E402
from megatron_pz.types import Status  # noqa: E402

RULE = "=" * 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="number of paragraphs to preview")
    parser.add_argument("--corpus", action="append", default=None,
                        help="shard file/dir/glob (repeatable); default: the shipped sample (train)")
    parser.add_argument("--template", choices=("plain", "chat"), default="plain", help="prompt wrapping")
    parser.add_argument("--span-mode", choices=SPAN_MODES, default="default", help="span rule variant")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle and span sampling seed")
    return parser


def preview(args: argparse.Namespace) -> str:
    """Render the preview text (also used by the test)."""
    reader = CorpusReader(CorpusConfig(paths=args.corpus or [], seed=args.seed, num_epochs=1))
    prompt_cfg = PromptConfig(style=args.template)
    span_cfg = SpanConfig(mode=args.span_mode)
    random_cfg = RandomSpanConfig()
    rng = random.Random(args.seed)
    out: list[str] = []
    for k, paragraph in enumerate(itertools.islice(reader, args.n)):
        gen = tasks.generation_samples(paragraph, f"preview/{paragraph.id}", 1, prompt_cfg)[0]
        out += [RULE, f"[{k}] paragraph {paragraph.id} ({paragraph.title})", RULE,
                "--- mask generation prompt ---", gen.prompt_text]
        # Simulated generator output: a random span that the rules accept, in the \mask{} format.
        simulated = sample_random_span(paragraph.text, span_cfg, random_cfg, rng)
        gen.response_text = f"(simulated reasoning) \\mask{{{simulated.span or ''}}}"
        gen.status = Status.COMPLETED
        result, preds = tasks.prediction_samples(gen, 1, span_cfg, prompt_cfg, seed=rng.randrange(2**31))
        out.append(f"--- simulated generator output: {gen.response_text!r} -> {result.reason.value}, "
                   f"{result.num_occurrences} occurrence(s) ---")
        if preds:
            out += [f"--- mask prediction prompt (target: {preds[0].metadata['target']!r}) ---", preds[0].prompt_text]
        baseline_result, baseline = tasks.random_span_samples(
            paragraph, f"preview/{paragraph.id}/random", 1, span_cfg, random_cfg, prompt_cfg, rng
        )
        if baseline:
            out += [f"--- Random-RLPT baseline prompt (target: {baseline[0].metadata['target']!r}) ---",
                    baseline[0].prompt_text]
        else:
            out.append(f"--- Random-RLPT baseline: no valid span ({baseline_result.reason.value}) ---")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(preview(args))
    except UserError as exc:
        print(f"preview_tasks: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
