"""``megatron-pz heldout``: held-out span probability (the gain) and paragraph NLL (the harm) of a checkpoint, per item.

Scores one-word spans of held-out wiki paragraphs (``eval.heldout``) with the run's prediction prompt: p(span),
log p(span) and greedy exact match, and the per-token NLL of the same paragraphs as plain text. Prints the
checkpoint's iteration and max|dw| against ``--reference`` (refusing unchanged weights unless
``--allow-unchanged``) and writes one JSON with per-item records and the means (``eval.heldout_stats`` pairs
two of them).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from megatron_pz.dtypes import SHORT_NAMES
from megatron_pz.errors import CheckpointError, ConfigError, UserError

logger = logging.getLogger(__name__)


class UnchangedWeights(UserError):
    """The scored weights equal the reference's (max|dw| == 0) and ``--allow-unchanged`` was not given."""


def register(sub: argparse._SubParsersAction) -> None:
    from megatron_pz.eval.heldout import SPLITS

    p = sub.add_parser("heldout", help="held-out span probability (gain) and paragraph NLL (harm), per item",
                       description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="what to score: a run folder, a Megatron checkpoint, an HF folder "
                                                 "or 'smollm2' (as for `megatron-pz eval --load`)")
    p.add_argument("--reference", required=True, metavar="SOURCE",
                   help="the starting weights (e.g. the warm-up run, or smollm2): max|dw| is printed and recorded")
    p.add_argument("--allow-unchanged", action="store_true",
                   help="score even when the weights equal the reference's (scoring the base itself)")
    p.add_argument("--split", choices=SPLITS, default="test", help="held-out wiki split (valid: for pilots)")
    p.add_argument("--data", default=None, help="paragraph file instead of the split's (JSON lines id/title/text)")
    p.add_argument("--items", type=int, default=1000, help="one-word span items, one per paragraph (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="picks the spans and the paragraphs")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="longest prediction prompt kept (256)")
    p.add_argument("--config", default=None, metavar="RUN_FILE",
                   help="run file (YAML, or a run's config.json) whose prompt, span, reward.pred_reward and "
                        "prediction response cap are used; default: the cloze arms' (chat style, pred_restate, "
                        "pred_cloze, continuation_match, 6 tokens)")
    p.add_argument("--out", default=None, help="JSON file (default runs/heldout/<load name>_<split>.json)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--dtype", choices=SHORT_NAMES, default="fp32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    p.set_defaults(func=run)


def load_layout(path: str | None):
    """The ``Layout`` of a run file: its prompt, span and reward sections and its prediction response cap."""
    from megatron_pz.data.prompts import PromptConfig
    from megatron_pz.data.spans import SpanConfig
    from megatron_pz.eval.heldout import DEFAULT_RESPONSE_CAP, Layout
    from megatron_pz.rewards.span import RewardConfig
    from megatron_pz.typed_yaml import build, read_yaml

    if path is None:
        return Layout()
    data = read_yaml(Path(path))
    sec = {k: data.get(k) or {} for k in ("prompt", "span", "reward", "rollout", "train")}
    cap = sec["rollout"].get("pred_max_new_tokens") or sec["train"].get("max_response_tokens") or DEFAULT_RESPONSE_CAP
    reward = build(RewardConfig, sec["reward"], path, where="reward")
    return Layout(prompt=build(PromptConfig, sec["prompt"], path, where="prompt"),
                  span=build(SpanConfig, sec["span"], path, where="span"), reward=reward.pred_reward,
                  max_new_tokens=int(cap))


def resolve(load: str, tokenizer: str | None = None, what: str = "--load") -> tuple[Path, Path, int | None]:
    """(HF folder, tokenizer folder, checkpoint iteration or None for HF weights) of a model source
    (``convert.source.hf_model``). A checkpoint is exported in the dtype it was saved in (so max|dw| compares
    stored weights); ``--dtype`` is the dtype of the forwards."""
    from megatron_pz.convert.source import hf_model

    model = hf_model(load, what=what, tokenizer=tokenizer)
    return model.hf_dir, model.tokenizer, model.iteration  # type: ignore[return-value]


def max_abs_delta(a_dir: str | Path, b_dir: str | Path) -> tuple[float, int]:
    """(max |a - b| over the tensors both HF folders' safetensors hold, number of tensors compared)."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        if not out:
            raise CheckpointError(f"{d}: no *.safetensors weights to compare")
        return out

    ia, ib = index(Path(a_dir)), index(Path(b_dir))
    common = sorted(ia.keys() & ib.keys())
    if not common:
        raise CheckpointError(f"{a_dir} and {b_dir} share no tensor names: not the same architecture")
    worst = 0.0
    for k in common:
        with safe_open(str(ia[k]), "pt") as ha, safe_open(str(ib[k]), "pt") as hb:
            x, y = ha.get_tensor(k).float(), hb.get_tensor(k).float()
        if x.shape != y.shape:
            raise CheckpointError(f"tensor {k}: shape {tuple(x.shape)} vs {tuple(y.shape)} in the reference")
        worst = max(worst, (x - y).abs().max().item() if x.numel() else 0.0)
    skipped = (ia.keys() | ib.keys()) - set(common)
    if skipped:
        logger.info("max|dw|: %d tensors only on one side not compared (%s)", len(skipped), sorted(skipped)[:3])
    return worst, len(common)


def score(lm, tok, items, layout, batch_size: int) -> list[dict[str, Any]]:
    """Per-item records: p(span), log p(span), the greedy answer and its reward, and the paragraph NLL."""
    import torch

    from megatron_pz.eval.heldout import end_mask, expected_reward
    from megatron_pz.eval.heldout_score import answer_scores, paragraph_nll, token_pieces
    from megatron_pz.rewards.registry import get_reward

    def enc(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    size = lm.model.get_output_embeddings().weight.shape[0]
    end = torch.tensor(end_mask(token_pieces(tok, size))) if layout.continuation else None
    answers = [enc(it.answer) for it in items]
    scores = answer_scores(lm, [enc(it.prompt) for it in items], answers, end, layout.max_new_tokens, batch_size)
    nll = paragraph_nll(lm, [enc(it.text) for it in items], batch_size)
    reward = get_reward(layout.reward)
    records = []
    for it, ans, sc, (s, k) in zip(items, answers, scores, nll):
        p_end = math.exp(sc.logp_end)
        p = expected_reward(sc.logp_tokens, p_end, len(ans), layout.max_new_tokens)
        log_p = sc.logp_tokens + (0.0 if len(ans) == layout.max_new_tokens else sc.logp_end)
        greedy = tok.decode(sc.greedy, skip_special_tokens=True)
        records.append({"key": it.key, "article": it.article, "paragraph": it.paragraph, "span": it.span,
                        "answer": it.answer, "answer_tokens": len(ans), "p": p, "log_p": log_p,
                        "p_end": p_end, "greedy": greedy,
                        "exact": float(reward(greedy, it.span)), "nll": s, "tokens": k})
    return records


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_pz.dtypes import long_name
    from megatron_pz.engine.model import load_model
    from megatron_pz.eval.heldout import default_data_path, draw_items, read_paragraphs, summarize

    t0 = time.perf_counter()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("items", "batch_size", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    layout = load_layout(args.config)
    data = Path(args.data) if args.data else default_data_path(args.split)
    if not data.is_file():
        raise ConfigError(f"held-out data {data} does not exist (--data PATH)")

    hf_dir, tok_dir, iteration = resolve(args.load, args.tokenizer)
    ref_dir, _, ref_iteration = resolve(args.reference, args.tokenizer, what="--reference")
    dw, n_tensors = max_abs_delta(hf_dir, ref_dir)
    it_text = f"iteration {iteration}" if iteration is not None else "an HF folder (no iteration)"
    print(f"scoring {args.load}: {it_text}; max|dw| = {dw:.6g} against --reference {args.reference} "
          f"({n_tensors} tensors)")
    if dw == 0.0 and not args.allow_unchanged:
        raise UnchangedWeights(f"--load {args.load} has the same weights as --reference {args.reference} "
                               f"(max|dw| = 0 over {n_tensors} tensors): nothing was trained; pass "
                               "--allow-unchanged to score the base itself")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(hf_dir, dtype=long_name(args.dtype), device=device)
    from megatron_pz.model.tokenizer import load_tokenizer

    wrapper = load_tokenizer(tok_dir)
    tok = getattr(wrapper, "tok", None)
    if tok is None:
        raise ConfigError(f"tokenizer {tok_dir}: held-out metrics need an HF tokenizer")
    chat = wrapper.apply_chat_template if getattr(tok, "chat_template", None) else None
    rows = read_paragraphs(data)
    items, counts = draw_items(rows, layout, lambda t: len(tok.encode(t, add_special_tokens=False)), args.items,
                               args.seed, args.max_prompt_tokens, chat)
    if len(items) < args.items:
        logger.warning("only %d eligible paragraphs in %s (asked for %d)", len(items), data, args.items)
    t_score = time.perf_counter()
    records = score(lm, tok, items, layout, args.batch_size)
    summary = summarize(records)
    wall = time.perf_counter() - t0
    name = Path(args.load.rstrip("/")).name
    out = Path(args.out) if args.out else Path("runs") / "heldout" / f"{name}_{args.split}.json"
    doc = {"load": args.load, "hf_folder": str(hf_dir), "iteration": iteration, "reference": args.reference,
           "reference_iteration": ref_iteration, "max_abs_dw": dw, "data": str(data), "split": args.split,
           "seed": args.seed, "items_asked": args.items, "max_prompt_tokens": args.max_prompt_tokens,
           "draw": counts, "layout": layout.to_dict(), "dtype": args.dtype, "device": device,
           "nll": "plain paragraph text, no BOS: tokens 2..n, each given the tokens before it",
           "command": "megatron-pz " + " ".join(sys.argv[1:]),
           "score_seconds": round(time.perf_counter() - t_score, 1), "wall_seconds": round(wall, 1),
           "summary": summary, "records": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    print(f"{summary['n']} items ({summary.get('articles', 0)} articles): mean p {summary.get('mean_p', 0):.4f}  "
          f"mean log p {summary.get('mean_log_p', 0):.3f}  greedy exact {summary.get('exact', 0):.3f}  "
          f"NLL/token {summary.get('nll_per_token', 0):.4f}")
    print(f"wrote {out} in {wall:.0f}s (scoring {doc['score_seconds']:.0f}s)")
    return 0
