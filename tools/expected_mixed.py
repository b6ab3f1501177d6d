#!/usr/bin/env python3
"""Expected share of mixed GRPO groups for a prediction prompt, from teacher-forced answer probabilities.

For held-out paragraphs with one seeded random span each (Random-span's own draw), it computes the probability p
that the model writes the exact answer (one forward pass, no sampling) under a prompt variant, and reports
E[mixed] = mean over items of 1 - p^G - (1-p)^G: the share of groups of G samples that DAPO would keep if every
other answer were wrong. docs/coldstart.md quotes it for SmolLM2-135M-Instruct:

    python tools/expected_mixed.py --load smollm2 --items 64
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def items(path: str, n: int, count_tokens, seed: int = 0):
    """(masked paragraph, span) for ``n`` paragraphs of 32-100 tokens, one-word spans (geometric_p = 1)."""
    from megatron_pz.data.spans import RandomSpanConfig, SpanConfig, sample_random_span

    rng = random.Random(seed)
    paras = [p for line in open(path) for p in json.loads(line)["text"].split("\n") if 32 <= count_tokens(p) <= 100]
    rng.shuffle(paras)
    out = []
    for p in paras:
        res = sample_random_span(p, SpanConfig(), RandomSpanConfig(geometric_p=1.0), rng)
        if res.valid:
            out.append((res.masked_text, res.span))
        if len(out) == n:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", default="smollm2", help="HF folder, or 'smollm2' (the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/wiki/test.jsonl"),
                    help="held-out paragraphs (JSON lines with 'text')")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_pz.convert.source import resolve_source
    from megatron_pz.data.prompts import PromptConfig, prediction_prompt

    src = resolve_source(args.load)
    hf = src.hf_dir or src.path
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    chat = lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731

    @torch.no_grad()
    def prob(prompt: str, answer: str) -> float:
        a = tok.encode(prompt, add_special_tokens=False)
        b = tok.encode(prompt + answer, add_special_tokens=False)
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))  # answer starts here
        ids = torch.tensor([b])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)  # (L-1, V)
        return math.exp(logp[k - 1:].gather(1, ids[0, k:, None]).sum().item())

    variants = {  # name -> (prompt config, answer text for span s)
        "paper prompt, answer '\\boxed{span}'": (PromptConfig(style="chat"), lambda s: "\\boxed{" + s + "}"),
        "restated (pred_restate), answer ' span'": (PromptConfig(style="chat", pred_restate=True), lambda s: " " + s),
        "cloze (pred_cloze), answer ' span'": (PromptConfig(style="chat", pred_restate=True, pred_cloze=True),
                                               lambda s: " " + s),
    }
    data = items(args.data, args.items, lambda t: len(tok.encode(t)), args.seed)
    print(f"{len(data)} held-out one-word spans from {args.data}")
    for name, (cfg, answer) in variants.items():
        ps = [prob(prediction_prompt(masked, cfg, chat), answer(span)) for masked, span in data]
        mixed = {g: statistics.mean(1 - p**g - (1 - p)**g for p in ps) for g in (8, 16, 32)}
        print(f"{name:45s} mean p {statistics.mean(ps):.3f}  median {statistics.median(ps):.4f}  "
              f"p > 0.05: {sum(p > 0.05 for p in ps) / len(ps):.2f}  E[mixed] G=8 {mixed[8]:.3f}  G=16 {mixed[16]:.3f}  G=32 {mixed[32]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
