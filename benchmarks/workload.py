"""The benchmark's fixed workload: the exact prediction prompts ``megatron-pz train`` makes for a run file.

``train.objective=random_span`` draws, per step, ``paragraphs_per_step`` paragraphs from the corpus and
``masks_per_paragraph`` random whole-word spans per paragraph, each a prompt answered ``predictions_per_mask``
times. ``build_workload`` replays that: the same corpus reader, token counter, chat template and seeds
``(train.seed, step, dp_rank=0, paragraph index)`` as ``trainer.collect.collect_random_span`` on one rank, so
the TRL side and the plain-``generate`` baseline get the very prompts (token ids) and targets our trainer gets.
The paragraph ids are returned too, so the bench can check them against the trainer's ``data_order.jsonl``.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Prompt:
    text: str
    ids: list[int]
    target: str
    group_id: str


@dataclass
class StepWork:
    step: int  # 0-based, as in train.py's loop
    paragraph_ids: list[str] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)


@dataclass
class Workload:
    hf_dir: str  # HF weights of the initial policy (what TRL and plain generate load)
    tokenizer_dir: str
    eos_token_id: int | None
    steps: list[StepWork]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        steps = [StepWork(s["step"], list(s["paragraph_ids"]), [Prompt(**p) for p in s["prompts"]])
                 for s in d["steps"]]
        return cls(d["hf_dir"], d["tokenizer_dir"], d["eos_token_id"], steps)


def hf_and_tokenizer_dirs(cfg: Any) -> tuple[Path, Path]:
    """(HF model folder, tokenizer folder) of ``policy.load``: smollm2's converted HF copy, or an HF folder."""
    from megatron_pz.convert.source import resolve_source, tokenizer_dir
    from megatron_pz.errors import ConfigError

    src = resolve_source(cfg.policy.load, what="policy.load")
    if src.hf_dir is None:
        raise ConfigError(f"bench compare needs policy.load = smollm2 or an HF model folder (TRL loads HF "
                          f"weights); got {cfg.policy.load!r}")
    return src.hf_dir, tokenizer_dir(src, cfg.policy.tokenizer) or src.hf_dir


def build_workload(cfg: Any, steps: int) -> Workload:
    """The prompts of steps 0..steps-1 of ``cfg`` (random-span objective, one DP rank)."""
    from megatron_pz.data.corpus import CorpusReader
    from megatron_pz.data.prompts import template_overhead_tokens
    from megatron_pz.data.tasks import random_span_samples
    from megatron_pz.model.tokenizer import load_tokenizer
    from megatron_pz.trainer.collect import sample_seed

    hf_dir, tok_dir = hf_and_tokenizer_dirs(cfg)
    tok = load_tokenizer(tok_dir)
    chat = None
    if cfg.prompt.style == "chat" and tok.apply_chat_template([{"role": "user", "content": "x"}]) is not None:
        chat = tok.apply_chat_template
    count = lambda s: len(tok.encode(s))
    # The corpus as the trainer reads it (a custom span.mask_token dropped); the layout does not matter here.
    corpus = CorpusReader(cfg.resolved(transformer_engine=False).corpus, count_tokens=count,
                          prompt_overhead_tokens=template_overhead_tokens(count, cfg.prompt, chat),
                          dp_rank=0, dp_world_size=1)
    t = cfg.train
    out = []
    for step in range(steps):
        work = StepWork(step)
        for i in range(t.paragraphs_per_step):
            p = next(corpus)
            work.paragraph_ids.append(str(p.id))
            rng = random.Random(sample_seed(t.seed, step, 0, i))
            for m in range(t.masks_per_paragraph):
                _, group = random_span_samples(p, f"s{step}/r0/p{i}/m{m}", t.predictions_per_mask, cfg.span,
                                               cfg.random_span, cfg.prompt, rng, chat)
                if group:
                    s = group[0]
                    work.prompts.append(Prompt(s.prompt_text, tok.encode(s.prompt_text), s.metadata["target"],
                                               s.group_id))
        out.append(work)
    return Workload(str(hf_dir), str(tok_dir), tok.eos_token_id, out)
