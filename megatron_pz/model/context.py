"""Running a RoPE model at a longer context than it was pretrained with (``policy.rope_scaling``).

The one scaling supported is linear position interpolation: every position is divided by ``factor`` before
the rotary angles are computed, so a model pretrained on N tokens sees positions 0 ... factor x N - 1 inside
the angle range it was trained on. It is the same computation in all three places that run the model:

* Megatron-Core: ``GPTModel(seq_len_interpolation_factor=factor)`` (``RotaryEmbedding``: ``seq *= 1 / factor``);
* HF transformers and SGLang: ``config.json`` ``rope_scaling`` / ``rope_parameters`` ``{"rope_type": "linear",
  "factor": factor}`` (``inv_freq / factor``), which the exported config carries;
* Megatron-LM: ``--rotary-seq-len-interpolation-factor``, written into our checkpoints' args.

YaRN and NTK-aware scaling are not offered: Megatron-Core's ``position_embedding_type="yarn"`` and HF's
``rope_type="yarn"`` differ in their defaults (attention factor, mscale), so the trainer and the rollout
engine would not compute the same log-probs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from megatron_pz.errors import ConfigError
from megatron_pz.model.arch import ModelArch

SCALING_TYPES = ("linear",)


def parse_rope_scaling(spec: dict[str, Any] | None, key: str = "policy.rope_scaling") -> float | None:
    """The linear interpolation factor of ``{type: linear, factor: F}`` (HF's ``rope_type`` also accepted)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{key} must be a mapping like {{type: linear, factor: 4}}, got {spec!r}")
    unknown = set(spec) - {"type", "rope_type", "factor"}
    if unknown:
        raise ConfigError(f"{key} has unknown keys {sorted(unknown)} (expected type and factor)")
    kind = spec.get("type", spec.get("rope_type"))
    if kind not in SCALING_TYPES:
        raise ConfigError(f"{key}.type={kind!r} is not supported (supported: {', '.join(SCALING_TYPES)}; "
                          f"see docs/megatron_lm.md for why not yarn)")
    factor = spec.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise ConfigError(f"{key}.factor must be a number > 1, got {factor!r}")
    return float(factor)


def extend_context(arch: ModelArch, factor: float | None, key: str = "policy.rope_scaling.factor") -> ModelArch:
    """``arch`` run at ``factor`` x its context with linear position interpolation; ``arch`` itself for None.

    A model that already interpolates by the same factor (a checkpoint of a run that extended it) is returned
    unchanged, so its context is not multiplied twice; any other existing scaling is refused. ``key`` names the
    setting in errors.
    """
    if factor is None:
        return arch
    if arch.rope_interpolation_factor == factor:
        return arch
    if arch.rope_interpolation_factor is not None:
        raise ConfigError(f"{key}={factor:g}, but the model already interpolates positions by "
                          f"{arch.rope_interpolation_factor:g}; set {key}={arch.rope_interpolation_factor:g} "
                          f"or remove it")
    if arch.rope_scaling_factor is not None:
        raise ConfigError(f"{key}={factor:g} cannot be combined with the model's Llama-3 rope scaling (factor "
                          f"{arch.rope_scaling_factor:g}); remove it")
    return dataclasses.replace(arch, rope_interpolation_factor=float(factor),
                               max_position_embeddings=int(round(arch.max_position_embeddings * factor)))
