#!/usr/bin/env python3
"""Will a model give PretrainZero any reward signal? Sample both tasks under prompt variants and count formats.

For each variant it samples ``--samples`` responses for each of ``--paragraphs`` validation paragraphs and reports
  generator: share of responses with a valid \\mask{span} (verbatim, < 8 occurrences: training's span rules);
  predictor: share with a \\boxed{} answer, and the exact-match rate on seeded random spans (training's reward).
A model at 0 % on both gets no GRPO signal at all (every group is all-0 and DAPO drops it). docs/results.md
quotes this table for SmolLM2-135M-Instruct:

    python tools/probe_formats.py --load smollm2 --paragraphs 8 --samples 4
    python tools/probe_formats.py --load smollm2 --paragraphs 24 --samples 8 --single-word --only predictor
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

GEN_PREFIX = "The masked words are: \\mask{"
PRED_PREFIX = "The masked words are: \\boxed{"
FORMAT_SYSTEM = ("You answer with a short explanation, then copy a few consecutive words from the paragraph exactly "
                 "and write them as \\mask{copied words}.")
# (name, task, system prompt, forced response start)
VARIANTS = (
    ("generator: paper prompt", "gen", "", ""),
    ("generator: + format system prompt", "gen", FORMAT_SYSTEM, ""),
    ("generator: + forced start '...\\mask{'", "gen", "", GEN_PREFIX),
    ("predictor: paper prompt", "pred", "", ""),
    ("predictor: + forced start '...\\boxed{'", "pred", "", PRED_PREFIX),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", default="smollm2", help="HF folder, or 'smollm2' (the cached SmolLM2-135M-Instruct)")
    p.add_argument("--paragraphs", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--gen-tokens", type=int, default=96)
    p.add_argument("--pred-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-word", action="store_true",
                   help="predictor rows mask one whole word (the easiest random span) instead of SpanBERT lengths")
    p.add_argument("--only", choices=("generator", "predictor"), default=None, help="run one task's rows only")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_pz.data import prompts
    from megatron_pz.data.parsers import extract_boxed, extract_mask
    from megatron_pz.data.spans import RandomSpanConfig, SpanConfig, apply_span, sample_random_span

    path = args.load
    if path == "smollm2":
        from megatron_pz.convert.smollm2 import prepare_smollm2

        path = str(prepare_smollm2()[0])
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def chat(messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    valid_dir = Path(__file__).resolve().parents[1] / "megatron_pz/assets/wiki_sample/valid"
    paras = [json.loads(line) for f in sorted(valid_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]
    paras = paras[: args.paragraphs]
    rng = random.Random(args.seed)
    span_lengths = RandomSpanConfig(geometric_p=1.0, max_words=1) if args.single_word else RandomSpanConfig()
    spans = [sample_random_span(x["text"], SpanConfig(), span_lengths, rng) for x in paras]

    rows = []
    for name, task, system, prefix in VARIANTS:
        if args.only and not name.startswith(args.only):
            continue
        cfg = prompts.PromptConfig(style="chat", system_prompt=system)
        if task == "gen":
            texts = [prompts.generation_prompt(x["text"], cfg, chat) + prefix for x in paras]
        else:
            texts = [prompts.prediction_prompt(s.masked_text, cfg, chat) + prefix for s in spans]
        enc = tok(texts, return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=args.temperature > 0, temperature=args.temperature or None,
                                 max_new_tokens=args.gen_tokens if task == "gen" else args.pred_tokens,
                                 num_return_sequences=args.samples, pad_token_id=pad)
        responses = [prefix + r for r in tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)]
        n = len(responses)
        if task == "gen":
            ok = sum(apply_span(paras[i // args.samples]["text"], extract_mask(r), SpanConfig()).valid
                     for i, r in enumerate(responses))
            row = {"variant": name, "responses": n, "valid_mask": ok / n}
        else:
            answers = [extract_boxed(r) for r in responses]
            exact = sum(a is not None and a.strip() == spans[i // args.samples].span for i, a in enumerate(answers))
            row = {"variant": name, "responses": n, "boxed": sum(a is not None for a in answers) / n,
                   "exact_match": exact / n}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| variant | responses | valid \\mask | \\boxed answer | exact match |\n|---|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{100 * r[k]:.0f} %" if k in r else "–" for k in ("valid_mask", "boxed", "exact_match")]
        print(f"| {r['variant']} | {r['responses']} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"load": args.load, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
