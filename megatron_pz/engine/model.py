"""Loading the engine's transformers causal LM and tokenizer, with the sampling defaults neutralised."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_pz.dtypes import torch_dtype
from megatron_pz.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# Model families whose KV cache is a plain DynamicCache, so one prefill can be shared by a prompt's n samples.
_SHARED_PREFILL_FAMILIES = ("Llama", "Qwen2", "Qwen3", "Mistral")
# generation_config keys kept from a checkpoint: token ids only (see load_model).
_KEPT_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version", "use_cache")


def parse_dtype(name: str) -> torch.dtype:
    """'float32' / 'bf16' / ... -> torch.dtype (ConfigError naming the value otherwise)."""
    try:
        return torch_dtype(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class LoadedModel:
    """A causal LM in eval mode on its device, and what generation needs to know about it."""

    model: Any
    """transformers ``PreTrainedModel`` (``AutoModelForCausalLM``), gradients off."""
    device: torch.device
    tokenizer: Any | None
    """None for a folder without tokenizer files: token ids still work, stop strings and text do not."""
    vocab_size: int
    """The true vocabulary: ids at or past it are padding rows, never sampled (``generation.mask_padded_vocab``)."""
    max_positions: int | None
    """``max_position_embeddings``; None when the config does not say."""
    eos_token_ids: set[int]
    pad_token_id: int
    share_prompts: bool
    """Prefill each distinct prompt once per batch (see ``generation.shared_prompt_cache``)."""
    cache_kw: str
    """Name of the forward's KV-cache argument: ``cache`` (transformers >= 5) or ``past_key_values``."""


def load_model(model_path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
               vocab_size: int | None = None) -> LoadedModel:
    """Load an HF folder; CheckpointError when it is not one, ConfigError for an unknown dtype.

    ``vocab_size``: the true vocabulary when the folder's embedding is padded past it (a Megatron-LM export
    written with its padded rows); default: the config's ``vocab_size`` (our exports write only the true rows).
    """
    from transformers import AutoModelForCausalLM

    torch_type = parse_dtype(dtype)
    if not (Path(model_path) / "config.json").is_file():
        raise CheckpointError(f"{model_path}: not an HF model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_type)
    return _prepare(model, _tokenizer(model_path), device, model_path, vocab_size)


def build_model(config_dir: str | Path, dtype: str = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    """The model of an HF folder's config.json, its parameters allocated but neither read nor initialised: for a
    colocated engine, whose parameters are then pointed at the trainer's (``convert.bridge.share_hf_params``).

    The allocations are never written, so they take address space, not memory, until they are replaced.
    CheckpointError when the folder has no config.json.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    torch_type = parse_dtype(dtype)
    if not (Path(config_dir) / "config.json").is_file():
        raise CheckpointError(f"{config_dir}: not an HF model folder (no config.json)")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_dir)), dtype=torch_type)
    model.tie_weights()  # from_pretrained ties; from_config under no_init_weights does not
    if (Path(config_dir) / "generation_config.json").is_file():  # its token ids, as from_pretrained reads them
        model.generation_config = GenerationConfig.from_pretrained(str(config_dir))
    return _prepare(model, _tokenizer(config_dir), device, config_dir, None)


def _tokenizer(model_path: str | Path) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path))
    except Exception as exc:  # a folder without tokenizer files still serves token ids
        logger.warning("no tokenizer in %s (%s): stop strings and text output are unavailable", model_path, exc)
        return None


def _prepare(model: Any, tokenizer: Any | None, device: str | torch.device, model_path: str | Path,
             vocab_size: int | None) -> LoadedModel:
    """Eval mode on ``device``, no gradients, the checkpoint's sampling defaults dropped."""
    from transformers import GenerationConfig

    device = torch.device(device)
    model.to(device).eval()
    model.requires_grad_(False)
    cfg = model.config
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = cfg.eos_token_id
    eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
    pad = model.generation_config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    pad_token_id = int(pad if pad is not None else min(eos_token_ids, default=0))
    # generate() fills every field we leave unset from model.generation_config; a checkpoint's defaults
    # (repetition_penalty, top_k, suppress_tokens, ...) would silently change the sampling distribution and
    # run before our logprob recorder. Keep only the special token ids.
    dropped = {k: v for k, v in model.generation_config.to_diff_dict().items()
               if k not in _KEPT_GENERATION_KEYS and not k.startswith(("output_", "_", "return_"))}
    if dropped:
        logger.info("ignoring the checkpoint's generation defaults %s (requests carry all sampling params)", dropped)
    model.generation_config = GenerationConfig(
        bos_token_id=model.generation_config.bos_token_id, eos_token_id=sorted(eos_token_ids) or None,
        pad_token_id=pad_token_id)
    return LoadedModel(
        model=model, device=device, tokenizer=tokenizer, vocab_size=_true_vocab(cfg, vocab_size, model_path),
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0) or None,
        eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
        share_prompts=type(model).__name__.startswith(_SHARED_PREFILL_FAMILIES),
        cache_kw="cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values",
    )


def _true_vocab(cfg: Any, vocab_size: int | None, model_path: str | Path) -> int:
    rows = int(cfg.vocab_size)
    if vocab_size is None:
        return rows
    if not 0 < vocab_size <= rows:
        raise ConfigError(f"vocab_size={vocab_size} must be in [1, {rows}] (the embedding rows of {model_path})")
    return int(vocab_size)
