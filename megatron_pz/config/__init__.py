"""The run configuration: one typed tree composed of each component's own config, loaded from YAML.

A run is a named YAML file. ``base: other.yaml`` inherits another file (paths relative to the file), so a
variant states only what it changes. ``key.sub=value`` overrides from the command line are applied last and
parsed as YAML scalars (``train.steps=10``, ``rollout.urls=[http://a:30000]``); a float field also takes
``5e-5``, which YAML alone would read as a string. The YAML mechanics live in ``megatron_pz.typed_yaml``.

Every section is a dataclass owned by the module that uses it (configs live near their owner); this package
composes them (the trainer-level sections are in ``config/sections.py``, ``rollout`` in ``config/rollout.py``,
Megatron-LM's command-line flags in ``config/flags.py``; all re-exported here) and validates the combination.
Unknown keys, wrong types and impossible combinations raise ``ConfigError`` naming the key and the file.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_pz.algo.advantages import AdvantageConfig
from megatron_pz.algo.loss import LossConfig
from megatron_pz.config.flags import FLAGS, Flag, flag_overrides
from megatron_pz.config.rollout import RolloutConfig
from megatron_pz.config.sections import (
    WANDB_MODES,
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    PolicyConfig,
    TrainConfig,
)
from megatron_pz.data.corpus import CorpusConfig
from megatron_pz.data.next_token import NextTokenConfig
from megatron_pz.data.objectives import OBJECTIVES, Objective, check_objective  # noqa: F401 (re-exported)
from megatron_pz.data.prompts import PromptConfig
from megatron_pz.data.spans import RandomSpanConfig, SpanConfig
from megatron_pz.data.tasks import SftConfig
from megatron_pz.errors import ConfigError
from megatron_pz.eval.runner import EvalConfig
from megatron_pz.model.provider import ModelConfig
from megatron_pz.parallel import ParallelConfig
from megatron_pz.rewards.span import RewardConfig
from megatron_pz.typed_yaml import apply_overrides, build, read_yaml

__all__ = [  # the sections and the flag table are defined in the submodules and re-exported here
    "FLAGS", "MOVED_KEYS", "SPAN_OBJECTIVES", "WANDB_MODES", "CheckpointConfig", "Flag", "LoggingConfig", "OptimConfig",
    "PolicyConfig", "RolloutConfig", "RunConfig", "TrainConfig", "flag_overrides", "load_config", "read_yaml",
]

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
    def resolved(self, transformer_engine: bool | None = None) -> RunConfig:
        """A new config with the derived values written out; this one is left as loaded (validation never changes
        a config). The trainer runs on it and records it in config.json:

        * ``train.shared_prompt``: null resolved (``shared_prompt_on``; ``transformer_engine`` as there);
        * ``train.shared_prompt_attention``: auto resolved (``row_attention_on``);
        * ``corpus.drop_if_contains``: a paragraph that already holds the mask token can never be masked
          (spans.MASK_TOKEN_IN_TEXT), so an objective that masks spans drops it at the corpus, where it is counted
          (stats "dropped_substring"), not once per rollout. The corpus default names "[mask]" only, so a custom
          ``span.mask_token`` is added.
        """
        drop = list(self.corpus.drop_if_contains)
        if self.train.objective_spec.masks_spans and self.span.mask_token not in drop:
            drop.append(self.span.mask_token)
        return dataclasses.replace(
            self,
            train=dataclasses.replace(self.train, shared_prompt=self.shared_prompt_on(transformer_engine),
                                      shared_prompt_attention=self.row_attention_on(transformer_engine)),
            corpus=dataclasses.replace(self.corpus, drop_if_contains=drop))

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

    def row_attention_on(self, transformer_engine: bool | None = None) -> str:
        """``train.shared_prompt_attention`` resolved, ``dense`` or ``segments`` (auto: see TrainConfig)."""
        if self.train.shared_prompt_attention != "auto":
            return self.train.shared_prompt_attention
        if transformer_engine is None:
            from megatron_pz.model.provider import use_transformer_engine

            transformer_engine = use_transformer_engine(self.model)
        return "dense" if transformer_engine else "segments"

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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run file (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data = apply_overrides(read_yaml(Path(path)) if path else {}, overrides)
    source = (str(path) if path else "<defaults>") + (" + overrides" if overrides else "")
    return build(RunConfig, data, source, MOVED_KEYS)
