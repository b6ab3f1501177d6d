"""One batched ``generate`` call with per-token log-probs and SGLang stop semantics.

Decoding, the KV cache and sampling are transformers' ``generate``; this module only adds what RL needs:

* per-token logprobs of the *sampled* tokens, ``log softmax(logits / T)`` before top-p/top-k (see
  ``rollout/protocol.py`` for why this is the SGLang-compatible definition), recorded by a logits processor that
  sees the raw logits (custom processors run before generate's temperature/top-k/top-p warpers) and gathered at
  the chosen token by a stopping criterion, so memory stays O(batch x vocab) instead of keeping every step's logits;
* SGLang stop semantics: EOS / ``stop_token_ids`` / stop strings end a sample and the ending token is kept in
  ``response_ids`` (SGLang returns ``output_ids`` untrimmed; only the text is trimmed, see
  ``DetokenizerManager.trim_matched_stop`` in ``sglang/srt/managers/detokenizer_manager.py``);
* abort: a set ``abort`` event ends the batch at its next token; rows return what they have, reason "abort";
* one prefill per distinct prompt (a request for n samples arrives as n identical rows);
* per-row sampling seeds (``SeededSampler``): each seeded row draws from its own generator, so rows with different
  seeds share one batch and a row's response depends on its seed and its own logits only, not on its neighbours;
* a prompt's own log-probs (``prompt_logprobs``): SGLang's ``input_token_logprobs`` / ``input_top_logprobs``;
* MoE models: the experts each fed token was routed to (``routing.py``), SGLang's ``routed_experts``.

Shapes: B = rows (prompts x samples) of one batch, L = padded prompt length, T = new tokens, V = vocabulary.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from megatron_pz.engine.model import LoadedModel
from megatron_pz.engine.routing import RoutingRecorder, assemble
from megatron_pz.engine.wire import PromptLogprobs
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams


def mask_padded_vocab(scores: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """``scores`` (..., V) with the ids >= ``vocab_size`` (an embedding padded past the true vocabulary, as
    Megatron pads it) at -inf, so no sampling path (greedy, top-k, top-p, plain) can pick them and they take no
    probability mass, exactly as the trainer masks them (``trainer/logprobs.py``). Unchanged when nothing is
    padded."""
    if vocab_size is None or scores.shape[-1] <= vocab_size:
        return scores
    out = scores.clone()
    out[..., vocab_size:] = float("-inf")
    return out


class LogprobRecorder:
    """Logits processor (first in generate's list, so it sees raw fp32 logits) that stashes log-probs.

    It also masks the padded vocabulary rows: the scores it returns are what every later warper and the greedy /
    sampling choice see."""

    def __init__(self, temperature: float, vocab_size: int | None = None):
        self.temperature = temperature
        self.vocab_size = vocab_size
        self.step_logprobs: torch.Tensor | None = None  # (B, V)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = mask_padded_vocab(scores, self.vocab_size)
        scaled = scores / self.temperature if self.temperature > 0 else scores
        self.step_logprobs = torch.log_softmax(scaled, dim=-1)
        return scores


class StopAndGather:
    """Stopping criterion run after each token: gathers the chosen token's logprob and applies SGLang stops.

    It records, per row, the step at which the sample ended and what matched (EOS/stop token id or stop string).
    HF's own EOS criterion only pads finished rows; the authoritative end of each sample is decided here.
    """

    def __init__(self, recorder: LogprobRecorder, prompt_len: int, batch: int, stop_ids: set[int],
                 stop_strs: tuple[str, ...], tokenizer, abort: threading.Event | None):
        self.recorder = recorder
        self.prompt_len = prompt_len
        self.stop_ids = stop_ids
        self.stop_strs = stop_strs
        self.tokenizer = tokenizer
        self.abort = abort
        self.logprobs: list[torch.Tensor] = []  # T x (B,)
        self.end_step = [-1] * batch  # index of the last kept token, -1 while running
        self.matched: list[int | str | None] = [None] * batch
        self.aborted = False
        # A stop string can only newly appear in the tail; 4 byte-level tokens can make up one character.
        self.tail_tokens = 4 * max((len(s) for s in stop_strs), default=0) + 4

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        step = input_ids.shape[1] - self.prompt_len - 1
        new_tokens = input_ids[:, -1]
        self.logprobs.append(self.recorder.step_logprobs.gather(1, new_tokens[:, None]).squeeze(1))
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, tok in enumerate(new_tokens.tolist()):
            if self.end_step[row] >= 0:
                done[row] = True
                continue
            if tok in self.stop_ids:
                self.end_step[row], self.matched[row] = step, tok
            elif self.stop_strs:
                tail = input_ids[row, max(self.prompt_len, input_ids.shape[1] - self.tail_tokens):].tolist()
                text = self.tokenizer.decode(tail, skip_special_tokens=False)
                hit = next((s for s in self.stop_strs if s in text), None)
                if hit is not None:
                    self.end_step[row], self.matched[row] = step, hit
            done[row] = self.end_step[row] >= 0
        if self.abort is not None and self.abort.is_set():
            self.aborted = True
            done[:] = True
        return done


class SeededSampler:
    """Last logits processor of a seeded batch: draws each row's token from that row's own generator.

    ``generate`` itself samples every row from torch's one global generator, so a row's draw would depend on the
    rows before it in the batch. Here the warped distribution of row r (temperature, top-k, top-p: the processors
    before this one, transformers' own warpers in transformers' order) is sampled with ``generators[r]``, and the
    returned scores leave only that token finite; ``generate`` runs greedy and picks it.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None  # built on the first call, on the logits' device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        # Inverse-CDF sampling: one uniform per row from its own generator, then one batched search. A token
        # warped away (probability 0) spans an empty interval and is never chosen.
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)  # (B, V)
        u = torch.stack([torch.rand((), generator=g, device=scores.device, dtype=torch.float64)
                         for g in self.generators])  # (B,)
        chosen = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)


def sampling_processors(params: SamplingParams, row_seeds: Sequence[int | None] | None) -> list:
    """Processors after the recorder: none for unseeded or greedy rows (``generate`` samples), else the warpers
    and a ``SeededSampler`` (an unseeded row of a seeded batch gets a seed from torch's global generator)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if params.greedy or row_seeds is None or all(s is None for s in row_seeds):
        return []
    seeds = [int(s) if s is not None else int(torch.randint(0, 2**62, ())) for s in row_seeds]
    warpers: list = [TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else []
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return [*warpers, SeededSampler(seeds)]


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L): every row's next token is at the same column."""
    prompt_len = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), prompt_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), prompt_len), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, prompt_len - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[r, prompt_len - len(ids):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_rows(lm: LoadedModel, rows: list[Sequence[int]], params: SamplingParams, version: int,
                  eos_token_ids: set[int], abort: threading.Event | None,
                  row_seeds: Sequence[int | None] | None = None,
                  preallocated_kv: bool = True) -> list[GenerationResult]:
    """Sample one response per row (left-padded into one batch) with the model's current weights.

    ``row_seeds``: one sampling seed per row (None: unseeded); ``params.seed`` is not read here, the caller
    derives the rows' seeds from it (``rollout.seeds``). ``preallocated_kv``: the KV cache is written in place
    (``decode.py``; same tokens and log-probs, no per-step copy of the cache) for the model families
    ``shared_prompt_cache`` serves; False: transformers' ``DynamicCache``. The caller holds the lock that keeps weights fixed for the
    call; every result is tagged with ``version``. ``prompt_index`` is left at -1 for the caller to fill.
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    from megatron_pz.engine.decode import preallocated_cache

    t0 = time.perf_counter()
    input_ids, attention_mask = left_pad(rows, lm.pad_token_id)
    prompt_len = input_ids.shape[1]
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
    recorder = LogprobRecorder(params.temperature, lm.vocab_size)
    samplers = sampling_processors(params, row_seeds)
    stopper = StopAndGather(recorder, prompt_len, len(rows), stop_ids, params.stop, lm.tokenizer, abort)
    # A fresh config: the model's generation_config defaults (repetition penalty, top_k=50, ...) must not
    # leak in, both for SGLang parity and so our recorder is the first processor to see the logits.
    native = not params.greedy and not samplers  # transformers samples (from torch's global generator)
    gen_cfg = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=native,
        temperature=params.temperature if native else None,
        top_p=params.top_p if native else None,
        top_k=(max(0, params.top_k)) if native else None,
        pad_token_id=lm.pad_token_id,
        eos_token_id=None if params.ignore_eos else sorted(eos_token_ids) or None,
    )
    input_ids, attention_mask = input_ids.to(lm.device), attention_mask.to(lm.device)
    with RoutingRecorder(lm.model) as routing:  # records nothing for a dense model
        capacity = prompt_len + params.max_new_tokens if preallocated_kv and lm.share_prompts else None
        cache = shared_prompt_cache(lm, rows, input_ids, attention_mask, capacity)
        shared = cache is not None
        if cache is None and capacity is not None:
            cache = preallocated_cache(lm.model.config, capacity)  # generate prefills every row into it
        cache_arg = {lm.cache_kw: cache} if cache is not None else {}
        sequences = lm.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **cache_arg,
            generation_config=gen_cfg, logits_processor=LogitsProcessorList([recorder, *samplers]),
            stopping_criteria=StoppingCriteriaList([stopper]),
        ).cpu()
    elapsed = time.perf_counter() - t0
    new_tokens = sequences[:, prompt_len:]  # (B, T)
    logprobs = torch.stack(stopper.logprobs, dim=1)[:, :new_tokens.shape[1]].float() if stopper.logprobs \
        else torch.zeros((len(rows), 0))  # (B, T)
    ends = []
    for r in range(len(rows)):
        end = stopper.end_step[r]
        if end >= 0:
            ends.append((end + 1, "stop", stopper.matched[r]))
        elif stopper.aborted:
            ends.append((new_tokens.shape[1], "abort", None))
        else:
            ends.append((new_tokens.shape[1], "length", None))
    routed = [None] * len(rows)
    if routing.calls:
        routed = assemble(routing.calls, [len(r) for r in rows], [n for n, _, _ in ends],
                          _distinct_index(rows) if shared else None)
    out = []
    for r, (n_keep, reason, matched) in enumerate(ends):
        ids = new_tokens[r, :n_keep].tolist()
        out.append(GenerationResult(
            prompt_index=-1, response_ids=ids, logprobs=logprobs[r, :n_keep].tolist(), finish_reason=reason,
            weight_version=version, text=response_text(lm.tokenizer, ids, matched, params), matched_stop=matched,
            extra={"e2e_latency": elapsed}, routed_experts=routed[r],
        ))
    return out


def _distinct_index(rows: Sequence[Sequence[int]]) -> list[int]:
    """Row -> index of its prompt among the distinct prompts in order of first appearance (the rows of
    ``shared_prompt_cache``'s prefill)."""
    first: dict[tuple[int, ...], int] = {}
    return [first.setdefault(tuple(r), len(first)) for r in rows]


@torch.no_grad()
def prompt_logprobs(lm: LoadedModel, prompt: Sequence[int], top_k: int) -> PromptLogprobs:
    """One forward over ``prompt``: each token's log-prob given the tokens before it and, for ``top_k > 0``, the
    ``top_k`` largest log-probs of that position's distribution. Raw logits (temperature 1), in fp32; index 0 is
    None (no context), as SGLang returns them. The caller holds the generation lock."""
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=lm.device)  # (1, L)
    logits = mask_padded_vocab(lm.model(input_ids=ids).logits[0, :-1].float(), lm.vocab_size)
    logp = torch.log_softmax(logits, dim=-1)  # (L-1, V)
    token = logp.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
    top = None
    if top_k > 0:
        vals, idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1)  # (L-1, K)
        top = [None] + [list(zip(v, i)) for v, i in zip(vals.tolist(), idx.tolist())]
    return PromptLogprobs(token_ids=[int(t) for t in prompt], token_logprobs=[None] + token, top=top)


def shared_prompt_cache(lm: LoadedModel, rows: list[Sequence[int]], input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, capacity: int | None = None):
    """The KV cache of columns [0, L-1) for every row, computed once per *distinct* prompt.

    A request for n samples of one prompt arrives as n identical rows. ``generate`` would prefill each of them:
    n x the prompt's forward pass. Instead each distinct prompt is prefilled once, without its last token, and
    the cache rows are copied to the rows that share it; ``generate`` then feeds only the last prompt column
    (it skips the columns a given cache covers) and samples as before. Positions follow ``generate``'s own rule
    for left padding (cumsum of the mask - 1). Returns None (plain ``generate``) when no prompt repeats, for
    prompts of one token, or for models whose cache is not a plain ``DynamicCache``. ``capacity``: build the cache
    with in-place layers of that many positions (``decode.preallocated_cache``); None: a plain ``DynamicCache``.
    """
    from transformers import DynamicCache

    from megatron_pz.engine.decode import preallocated_cache

    if input_ids.shape[1] < 2 or not lm.share_prompts:
        return None
    index = _distinct_index(rows)
    if max(index) + 1 == len(rows):
        return None
    rep = [0] * (max(index) + 1)
    for row, u in enumerate(index):
        if rep[u] == 0:
            rep[u] = row + 1
    sel = torch.tensor([r - 1 for r in rep], device=input_ids.device)
    ids_u, mask_u = input_ids[sel, :-1], attention_mask[sel, :-1]  # (U, L-1), U = distinct prompts
    pos = (mask_u.long().cumsum(-1) - 1).masked_fill_(mask_u == 0, 1)
    cache = DynamicCache(config=lm.model.config) if capacity is None else preallocated_cache(lm.model.config, capacity)
    lm.model(input_ids=ids_u, attention_mask=mask_u, position_ids=pos, use_cache=True, logits_to_keep=1,
             **{lm.cache_kw: cache})
    cache.batch_select_indices(torch.tensor(index, device=input_ids.device))
    return cache


def response_text(tokenizer, ids: list[int], matched: int | str | None, params: SamplingParams) -> str | None:
    """Decoded response, trimmed like SGLang's DetokenizerManager.trim_matched_stop (no_stop_trim=False)."""
    if tokenizer is None:
        return None
    if isinstance(matched, int) and ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
    if isinstance(matched, str):
        pos = text.find(matched)
        if pos >= 0:
            text = text[:pos]
    return text
