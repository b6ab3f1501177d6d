"""The forwards of the held-out metrics (``eval.heldout``), batched on an HF causal LM.

``answer_scores``: per item, one teacher-forced forward of prompt + answer, run as a prefill of the left-padded
prompts (logits of the last position only) and a continuation of the right-padded answer tokens on the prefill's
KV cache (explicit position ids, so padding changes nothing); it gives log p(answer tokens) and log p(end), the
log of the probability mass of the next-token distribution after the answer on the tokens of ``end`` (a boolean
mask over the vocabulary). The cache is then cut back to the prompt and the model decodes greedily.

``paragraph_nll``: the summed next-token NLL of each paragraph as plain text (no BOS, no prompt: tokens 2..n are
scored, each given the tokens before it), computed row by row from the final hidden states so that the full
(batch, length, vocabulary) logits are never held at once.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_pz.engine.model import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class AnswerScore:
    logp_tokens: float  # sum of log p over the answer tokens
    logp_end: float  # log p(the answer ends there); 0.0 when no end mask is given (p(end) = 1)
    greedy: list[int]  # greedy continuation of the prompt, cut after the first stop token


def token_pieces(tok, size: int) -> list[str]:
    """The text each of ``size`` token ids adds when written after a letter (an HF tokenizer's decode; special
    tokens give "", ids beyond the tokenizer give "")."""
    anchor = tok.encode("a", add_special_tokens=False)
    base = tok.decode(anchor, skip_special_tokens=True)
    n = min(size, len(tok))
    texts = tok.batch_decode([anchor + [i] for i in range(n)], skip_special_tokens=True)
    return [t[len(base):] if t.startswith(base) else t for t in texts] + [""] * (size - n)


def _batches(order: Sequence[int], size: int):
    for i in range(0, len(order), size):
        yield order[i:i + size]


@torch.no_grad()
def answer_scores(lm: LoadedModel, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                  end: torch.Tensor | None, greedy_tokens: int, batch_size: int = 16) -> list[AnswerScore]:
    """Teacher-forced answer log-probabilities and greedy decodes (``greedy_tokens`` at most, cut after the
    first EOS), batched by prompt length (see the module doc)."""
    from transformers import DynamicCache

    model, pad_id, stops = lm.model, lm.pad_token_id, lm.eos_token_ids
    end = None if end is None else end.to(lm.device)
    out: list[AnswerScore | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    t0, done = time.perf_counter(), 0
    for idx in _batches(order, batch_size):
        b = len(idx)
        plen = max(len(prompts[i]) for i in idx)
        alen = max(len(answers[i]) for i in idx)
        ids = torch.full((b, plen), pad_id, dtype=torch.long)
        mask = torch.zeros((b, plen), dtype=torch.long)
        aids = torch.full((b, alen), pad_id, dtype=torch.long)
        amask = torch.zeros((b, alen), dtype=torch.long)
        for r, i in enumerate(idx):
            p, a = prompts[i], answers[i]
            ids[r, plen - len(p):] = torch.tensor(p)
            mask[r, plen - len(p):] = 1
            aids[r, :len(a)] = torch.tensor(a)
            amask[r, :len(a)] = 1
        ids, mask, aids, amask = (t.to(lm.device) for t in (ids, mask, aids, amask))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        last = pos[:, -1:]  # position of each prompt's last token
        cache = DynamicCache(config=model.config)
        pre = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{lm.cache_kw: cache})
        first = pre.logits[:, -1].float().log_softmax(-1)  # (b, V): predicts answer token 0
        cont = model(input_ids=aids, attention_mask=torch.cat([mask, amask], 1),
                     position_ids=last + 1 + torch.arange(alen, device=lm.device), use_cache=True,
                     **{lm.cache_kw: cache})
        rest = cont.logits.float().log_softmax(-1)  # (b, alen, V): row j predicts answer token j + 1
        dists = torch.cat([first[:, None], rest], 1)  # (b, alen + 1, V)
        for r, i in enumerate(idx):
            a = answers[i]
            lp = dists[r, torch.arange(len(a)), torch.tensor(a, device=lm.device)].sum().item()
            le = 0.0 if end is None else torch.logsumexp(dists[r, len(a)][end], 0).item()
            out[i] = AnswerScore(logp_tokens=lp, logp_end=le, greedy=[])
        # greedy decode from the prompt on the same cache
        cache.crop(-alen)  # back to the prompt (a negative count removes that many tokens, in transformers 4 and 5)
        gen = [first[:, :lm.vocab_size].argmax(-1)]
        gmask = mask
        for step in range(1, greedy_tokens):
            gmask = torch.cat([gmask, torch.ones((b, 1), dtype=torch.long, device=lm.device)], 1)
            step_out = model(input_ids=gen[-1][:, None], attention_mask=gmask, position_ids=last + step,
                             use_cache=True, **{lm.cache_kw: cache})
            gen.append(step_out.logits[:, -1, :lm.vocab_size].argmax(-1))
        toks = torch.stack(gen, 1).tolist()
        for r, i in enumerate(idx):
            seq = []
            for t in toks[r]:
                seq.append(t)
                if t in stops:
                    break
            out[i].greedy = seq
        done += b
        logger.info("answers: %d/%d items, %.0fs", done, len(prompts), time.perf_counter() - t0)
    return out  # type: ignore[return-value]


@torch.no_grad()
def paragraph_nll(lm: LoadedModel, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed NLL in nats, scored tokens) per token sequence: tokens 2..n given the ones before (no BOS)."""
    model, pad_id = lm.model, lm.pad_token_id
    out: list[tuple[float, int] | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    head = model.get_output_embeddings()
    t0, done = time.perf_counter(), 0
    for idx in _batches(order, batch_size):
        b, n = len(idx), max(len(seqs[i]) for i in idx)
        ids = torch.full((b, n), pad_id, dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        for r, i in enumerate(idx):
            k = len(seqs[i])
            if k < 2:
                out[i] = (0.0, 0)
                continue
            logits = head(hidden[r, :k - 1]).float()
            nll = torch.nn.functional.cross_entropy(logits, ids[r, 1:k], reduction="sum").item()
            out[i] = (nll, k - 1)
        done += b
        logger.info("paragraph NLL: %d/%d, %.0fs", done, len(seqs), time.perf_counter() - t0)
    return out  # type: ignore[return-value]
