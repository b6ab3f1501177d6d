"""TRL's ``GRPOTrainer`` as a library: given prompts, a reward function and our hyper-parameters, train and report.

    from benchmarks.trl_grpo import GRPOPrompt, GRPOSettings, train_grpo
    result = train_grpo(hf_dir, prompts, exact_match, GRPOSettings.from_config(cfg), prompts_per_step=8,
                        out_dir="runs/trl")
    result.rewards   # per-step mean reward, one float per optimizer step

``benchmarks.sides`` runs it for the throughput comparison; a learning cross-check (ours vs TRL on the same
prompts, reward, lr, batch and group size) calls it the same way and compares ``rewards`` curves.

What is set to match ``megatron-pz train`` (all names checked against trl 1.16's GRPOConfig; the ``bench``
extra pins that version because ``_tokenize_prompts`` and ``_generate_*`` below are TRL internals):
  one optimizer step per training step over all ``prompts_per_step x num_generations`` samples
  (per_device_train_batch_size = micro_batch_size, gradient_accumulation_steps = samples / micro_batch_size,
  so TRL generates once per step for the whole batch, like our rollout), num_generations = predictions_per_mask,
  max_completion_length = pred_max_new_tokens, temperature, top_p, top_k=0, learning_rate, AdamW betas/eps,
  weight_decay, max_grad_norm = clip_grad, cosine schedule without warm-up, beta=0 (no KL, no reference model),
  epsilon = eps_low, epsilon_high = eps_high, loss_type="dapo" (token sum / tokens of the whole step, as ours),
  scale_rewards="group" (our std-normalised group advantages), num_iterations=1 (so TRL, like us, does not
  recompute old log-probs), no gradient checkpointing (ours has no recompute), use_cpu, fp32, TRL's own
  ``transformers`` generation (no vLLM), no dataset shuffling (prompts are consumed in the given order), no
  checkpoint saving. Prompts given with token ids are sent as exactly those ids (``_tokenize_prompts`` is
  overridden); prompts without ids are tokenized by TRL.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

# (completion text, target) -> reward; e.g. megatron_pz.rewards.span.exact_match
RewardFn = Callable[[str, str], float]


@dataclass
class GRPOPrompt:
    text: str
    target: str  # handed to the reward function with each completion of this prompt
    ids: list[int] | None = None  # the exact prompt token ids to send; None = TRL tokenizes ``text``


@dataclass
class GRPOSettings:
    """The hyper-parameters matched between our trainer and TRL (names as in our run config)."""

    num_generations: int  # group size: completions per prompt (train.predictions_per_mask)
    micro_batch_size: int  # samples per forward/backward; a step accumulates all of its samples
    max_completion_length: int
    temperature: float
    top_p: float
    lr: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    eps_low: float
    eps_high: float

    @classmethod
    def from_config(cls, cfg: Any) -> GRPOSettings:
        """The settings of a megatron_pz run config (its predictor rollouts: random-span / mask prediction)."""
        o, loss = cfg.optim, cfg.loss
        return cls(num_generations=cfg.train.predictions_per_mask, micro_batch_size=cfg.train.micro_batch_size,
                   max_completion_length=cfg.pred_max_new_tokens, temperature=cfg.rollout.temperature,
                   top_p=cfg.rollout.top_p, lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
                   adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, eps_low=loss.eps_low,
                   eps_high=loss.eps_high)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GRPOSettings:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class GRPOResult:
    rewards: list[float]  # TRL's logged mean reward of each optimizer step
    steps: list[dict[str, float]] = field(default_factory=list)  # per step: step_s, rollout_s, train_s, tokens
    params: int = 0
    trl_version: str = ""


def train_grpo(hf_dir: str, prompts: Sequence[GRPOPrompt], reward: RewardFn, settings: GRPOSettings, *,
               prompts_per_step: int, out_dir: str, steps: int | None = None, tokenizer_dir: str | None = None,
               seed: int = 0) -> GRPOResult:
    """Train the HF model in ``hf_dir`` with TRL's GRPOTrainer (CPU, fp32) and return per-step rewards and timings.

    Step k trains on ``prompts[k * prompts_per_step:(k + 1) * prompts_per_step]``, each answered
    ``settings.num_generations`` times; ``steps`` defaults to ``len(prompts) // prompts_per_step``.
    The torch seed is set to ``seed`` before the model is loaded; the caller sets the thread count.
    """
    try:
        import trl
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:  # compare.py checks first; this is the fallback message
        raise SystemExit(f"bench: TRL is not installed ({exc}); pip install 'megatron_pz[bench]'") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(int(seed))
    s = settings
    n = int(s.num_generations)
    steps = len(prompts) // prompts_per_step if steps is None else steps
    per_step = prompts_per_step * n
    mbs = int(s.micro_batch_size)
    if per_step % mbs:
        raise SystemExit(f"bench: samples per step ({per_step}) must be a multiple of the micro-batch ({mbs})")
    rows = [{"prompt": p.text, "target": p.target} for p in prompts]
    ids_of = {p.text: p.ids for p in prompts} if all(p.ids is not None for p in prompts) else None

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or hf_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)

    def reward_fn(prompts, completions, target, **kw):
        return [reward(c, t) for c, t in zip(completions, target)]

    reward_fn.__name__ = f"reward_{getattr(reward, '__name__', 'fn')}"  # TRL names its reward metrics by it

    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=int(seed), max_steps=steps,
        per_device_train_batch_size=mbs, gradient_accumulation_steps=per_step // mbs, num_generations=n,
        max_completion_length=int(s.max_completion_length), temperature=float(s.temperature),
        top_p=float(s.top_p), top_k=0, learning_rate=float(s.lr), lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=float(s.weight_decay), adam_beta1=float(s.adam_beta1),
        adam_beta2=float(s.adam_beta2), adam_epsilon=float(s.adam_eps), max_grad_norm=float(s.clip_grad),
        beta=0.0, epsilon=float(s.eps_low), epsilon_high=float(s.eps_high), loss_type="dapo",
        scale_rewards="group", num_iterations=1, gradient_checkpointing=False, shuffle_dataset=False,
        dataloader_num_workers=0, use_vllm=False, log_completions=False,
    )
    timed_cls, clock = _timed_trainer(GRPOTrainer, ids_of)
    trainer = timed_cls(model=model, reward_funcs=[reward_fn], args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tok, callbacks=[clock])
    trainer.train()
    rewards = [r.get("reward") for r in trainer.state.log_history if "reward" in r]
    return GRPOResult(rewards=rewards, steps=clock.phases, params=sum(p.numel() for p in model.parameters()),
                      trl_version=trl.__version__)


def _timed_trainer(base: type, ids_of: dict[str, list[int]] | None) -> tuple[type, Any]:
    """A GRPOTrainer subclass that times generation and the rollout phase, and a callback closing each step.

    Per step: generate_s and generated_tokens (TRL's generation call), rollout_s (generation + scoring +
    advantages), trained/loss/padded tokens and samples of the step, step_s (callback to callback) and
    train_s = step_s - rollout_s.
    """
    from transformers import TrainerCallback

    cur: dict[str, float] = {}

    class Timed(base):
        if ids_of is not None:
            def _tokenize_prompts(self, prompts):  # our exact token ids (the same prompts our trainer sends)
                return [list(ids_of[p]) for p in prompts], None, {}

        def _generate_single_turn(self, *a, **k):
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **k)
            cur["generate_s"] = cur.get("generate_s", 0.0) + time.perf_counter() - t0
            cur["generated_tokens"] = cur.get("generated_tokens", 0) + sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            cur["rollout_s"] = cur.get("rollout_s", 0.0) + time.perf_counter() - t0
            cur["trained_tokens"] = cur.get("trained_tokens", 0) + int(out["prompt_mask"].sum()) + int(
                out["completion_mask"].sum())
            cur["loss_tokens"] = cur.get("loss_tokens", 0) + int(out["completion_mask"].sum())
            cur["samples"] = cur.get("samples", 0) + int(out["completion_mask"].shape[0])
            cur["padded_tokens"] = cur.get("padded_tokens", 0) + int(out["prompt_mask"].numel()) + int(
                out["completion_mask"].numel())
            return out

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.last = 0.0
            self.phases: list[dict[str, float]] = []

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            cur["step_s"] = now - self.last
            cur["train_s"] = cur["step_s"] - cur.get("rollout_s", 0.0)
            self.last = now
            self.phases.append(dict(cur))
            cur.clear()

    return Timed, Clock()
