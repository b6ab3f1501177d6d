"""Build a run once: parallel groups, tokenizer, policy (+ optimizer), weight publisher, rollout source (corpus,
engine), checkpointer over the stateful parts, logger; then the frozen ``Run``. Every part is built before the run,
and nothing assigns a field of the run after. Only building lives here; the per-step work is in ``train.py``.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from megatron.core import parallel_state as ps

from megatron_pz import checkpoint as ckpt
from megatron_pz.config import RunConfig
from megatron_pz.convert.bridge import load_hf_into_model
from megatron_pz.convert.hf_io import HFCheckpoint, aux_files
from megatron_pz.convert.source import ModelSource, resolve_source, tokenizer_dir
from megatron_pz.data.corpus import CorpusReader
from megatron_pz.data.prompts import template_overhead_tokens
from megatron_pz.dtypes import torch_dtype
from megatron_pz.errors import ConfigError
from megatron_pz.logs import RunLogger
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.context import extend_context, parse_rope_scaling
from megatron_pz.model.provider import build_model, unwrap
from megatron_pz.model.tokenizer import load_tokenizer
from megatron_pz.parallel import DataLayout, data_owner_rank, describe_hosts, init_distributed, is_rank0
from megatron_pz.trainer.checkpointer import Checkpointer
from megatron_pz.trainer.optimizer import ScheduleState, TrainingState, setup_training
from megatron_pz.trainer.preflight import preflight
from megatron_pz.trainer.rng import RNGState
from megatron_pz.trainer.rollout_source import RolloutSource
from megatron_pz.trainer.run import Run, StopRequest
from megatron_pz.trainer.step import NonFiniteSteps
from megatron_pz.weight_sync.publisher import WeightPublisher

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ build
def tokenizer_chat_template(cfg: RunConfig, tokenizer):
    """The tokenizer's chat template when prompt.style is "chat" (None otherwise or when it has none)."""
    if cfg.prompt.style != "chat":
        return None
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    return tokenizer.apply_chat_template if probe is not None else None


def validate_lengths(cfg: RunConfig, arch: ModelArch, template_tokens: int = 0) -> None:
    """Prompt cap + response cap must fit the model's context, and the prompt template (``template_tokens``: the
    longest template rendered around an empty paragraph) must leave room for a paragraph. Checked before any
    heavy work; each failure is one line naming the context, the template length and the key to change."""
    context = arch.max_position_embeddings
    response = max(cfg.gen_max_new_tokens, cfg.pred_max_new_tokens)
    prompt_cap = cfg.corpus.max_prompt_tokens
    # The factor is counted from the pretrained context (a run that already interpolates states the total).
    interpolation = arch.rope_interpolation_factor
    pretrained = context / (interpolation or 1.0)
    longer = ("" if arch.rope_scaling_factor is not None else  # Llama-3 rope scaling: no linear on top
              f", or run the model at a longer context with policy.rope_scaling={{type: linear, factor: "
              f"{_factor_for(prompt_cap + response, pretrained)}}}")
    where = f"the model's context of {context} tokens (max_position_embeddings"
    where += f", rope interpolation x{interpolation:g})" if interpolation else ")"
    need = template_tokens + cfg.corpus.prompt_margin_tokens + cfg.corpus.min_paragraph_tokens
    if need > prompt_cap:
        what = (f"the prompt template alone takes {template_tokens} tokens (+ corpus.prompt_margin_tokens "
                f"{cfg.corpus.prompt_margin_tokens} + corpus.min_paragraph_tokens {cfg.corpus.min_paragraph_tokens}), "
                f"more than corpus.max_prompt_tokens ({prompt_cap}): no paragraph fits; ")
        if need + response <= context:
            raise ConfigError(what + f"raise corpus.max_prompt_tokens to at least {need} (the context is {context} "
                              f"tokens)")
        # A larger prompt cap cannot help: the template and the longest response do not fit the context together.
        way_out = ("lower train.max_response_tokens / rollout.gen_max_new_tokens / rollout.pred_max_new_tokens"
                   if arch.rope_scaling_factor is not None else
                   f"run the model at a longer context with policy.rope_scaling={{type: linear, factor: "
                   f"{_factor_for(need + response, pretrained)}}} and corpus.max_prompt_tokens >= {need}")
        raise ConfigError(what + f"with the longest response cap ({response}) that exceeds {where}; {way_out}")
    if prompt_cap + response > context:
        raise ConfigError(
            f"corpus.max_prompt_tokens ({prompt_cap}, of which the prompt template takes {template_tokens}) + the "
            f"longest response cap ({response}) = {prompt_cap + response} exceeds {where}; lower "
            f"corpus.max_prompt_tokens or train.max_response_tokens / rollout.gen_max_new_tokens / "
            f"rollout.pred_max_new_tokens{longer}")


def _factor_for(need: int, context: float) -> str:
    """The smallest linear interpolation factor (in quarters) that makes ``need`` tokens fit ``context``."""
    import math

    return f"{math.ceil(4 * need / context) / 4:g}"


def install_stop_signals(stop: StopRequest) -> None:
    """SIGUSR1 (Slurm's --signal=USR1@T before the time limit) and SIGTERM: checkpoint after this step, exit."""

    def handler(signum, frame):
        stop.set()
        logger.warning("received signal %d: will checkpoint after the current step and stop", signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass


def setup(cfg: RunConfig) -> Run:
    """Build the whole run; resumes from <output_dir>/checkpoints when one exists (and auto_resume)."""
    preflight(cfg)  # every input path, before process groups, model or servers
    cfg = cfg.resolved()  # derived values (shared_prompt, drop_if_contains) written out, recorded so in config.json
    init_distributed(cfg.parallel)
    logger.info("process group: %s (%s)", describe_hosts(), torch.distributed.get_backend())
    rank = torch.distributed.get_rank()
    dp_size = cfg.validate_world(torch.distributed.get_world_size())
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    src = resolve_source(cfg.policy.load, what="policy.load", collective=True)
    tok_dir = tokenizer_dir(src, cfg.policy.tokenizer, allow_pickle=cfg.policy.allow_pickle) or src.path
    tokenizer = load_tokenizer(tok_dir)
    # A Megatron-LM checkpoint's true vocabulary: policy.vocab_size, its args.vocab_size, else this tokenizer.
    arch = (ckpt.read_arch(src.path, vocab_size=cfg.policy.vocab_size, allow_pickle=cfg.policy.allow_pickle,
                           tokenizer_size=tokenizer.vocab_size)
            if src.kind == "mcore" else ModelArch.from_hf_config(src.path))
    arch = extend_context(arch, parse_rope_scaling(cfg.policy.rope_scaling))
    count = lambda s: len(tokenizer.encode(s))  # noqa: E731
    chat_template = tokenizer_chat_template(cfg, tokenizer)
    overhead = template_overhead_tokens(count, cfg.prompt, chat_template)
    validate_lengths(cfg, arch, overhead)
    training = setup_training(build_model(arch, cfg.model, cfg.parallel, masked_rows=cfg.masked_rows,
                                          segment_attention=cfg.train.shared_prompt_attention == "segments"),
                              cfg.optim, cfg.train.steps)
    layout = DataLayout(dp_rank=ps.get_data_parallel_rank(), dp_size=dp_size, is_data_owner=rank == data_owner_rank())
    weights = WeightPublisher(arch, torch_dtype(cfg.rollout.weights_dtype))
    # A restated prompt holds the paragraph and, at most, a second copy of its longest sentence.
    corpus = (CorpusReader(cfg.corpus, count_tokens=count, prompt_overhead_tokens=overhead,
                           paragraph_copies=2 if cfg.prompt.pred_restate else 1,
                           dp_rank=layout.dp_rank, dp_world_size=dp_size)
              if layout.is_data_owner else None)
    rollout = RolloutSource(cfg, layout, tokenizer, chat_template, weights, corpus)
    checkpointer = Checkpointer(out, cfg.checkpoint, cfg.train.steps, training=training, arch=arch, run_name=cfg.name,
                                parts={"scheduler": ScheduleState(training, cfg.optim, cfg.train.steps),
                                       "weights": weights, "rollout": rollout, "rng": RNGState()})
    if checkpointer.can_resume():
        start_step = checkpointer.load()
    else:
        start_step = 0
        load_initial_weights(training, arch, src)
    # Logged step numbers count completed steps (1-based): the first one this process logs is start_step + 1,
    # so lines a killed run wrote after its last checkpoint (and only those) are dropped.
    run_logger = RunLogger(out, total_steps=cfg.train.steps, start_step=start_step + 1, steps_done=start_step,
                           tensorboard=cfg.logging.tensorboard, wandb=wandb_settings(cfg) if rank == 0 else None,
                           progress_bar=cfg.logging.progress_bar,
                           enabled=rank == 0, resumed_from=checkpointer.resumed_from)
    write_hf_meta(out, arch, tok_dir)
    rollout.start(out, [unwrap(m) for m in training.model])
    run = Run(cfg=cfg, out=out, arch=arch, tokenizer=tokenizer, training=training, layout=layout, weights=weights,
              rollout=rollout, checkpointer=checkpointer, logger=run_logger,
              nonfinite=NonFiniteSteps(cfg.train.max_nonfinite_steps), chat_template=chat_template,
              start_step=start_step)
    install_stop_signals(run.stop)
    return run


def wandb_settings(cfg: RunConfig) -> dict[str, Any] | None:
    """``logs.writers.WandbLog``'s arguments when ``logging.wandb`` is on (the whole config as the W&B run config)."""
    lg = cfg.logging
    if not lg.wandb:
        return None
    return {"project": lg.wandb_project, "entity": lg.wandb_entity, "name": lg.wandb_name or cfg.name,
            "mode": lg.wandb_mode, "config": cfg.to_dict()}


def load_initial_weights(training: TrainingState, arch: ModelArch, src: ModelSource) -> None:
    """A fresh run starts from ``policy.load``: a Megatron checkpoint (any TP/PP) or an HF folder. Collective.

    Model weights only. When ``policy.load`` is another training run (its folder or its ``checkpoints/``, e.g. a
    warm-up stage), its newest iteration's weights are loaded and everything else starts fresh: the optimizer
    state (Adam moments and step count), the LR schedule, the step counter, the weight version and the corpus
    position. Resuming with all of that is what ``<output_dir>/checkpoints`` of this run is for."""
    chunks = [unwrap(m) for m in training.model]
    if src.kind == "mcore":
        ckpt.load(src.path, chunks, arch)
    else:
        load_hf_into_model(chunks, HFCheckpoint(src.path).get, arch)
    training.optimizer.reload_model_params()  # main (fp32) params <- the loaded model params
    logger.info("initial weights from %s (%s); optimizer, LR schedule, step and corpus position start fresh",
                src.path, src.kind)


def write_hf_meta(out: Path, arch: ModelArch, tok_dir: Path) -> None:
    """config.json + tokenizer files for the rollout engine's HF weight folders (rank 0)."""
    if not is_rank0():
        return
    meta_dir = out / ckpt.RUN_HF_META_DIR
    meta_dir.mkdir(parents=True, exist_ok=True)
    (meta_dir / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
    if tok_dir.is_dir():
        for f in aux_files(tok_dir):
            shutil.copy2(f, meta_dir / f.name)


def shutdown(run: Run) -> None:
    run.logger.close()
    run.rollout.close()
