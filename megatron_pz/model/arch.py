"""One description of a decoder-only architecture, readable from an HF ``config.json`` or Megatron-LM args.

``ModelArch`` is the single source of truth the model provider, the converters and the checkpoints share.
It is a plain dataclass (JSON round-trippable) so it can be stored beside every checkpoint. Its fields, what derives
from them and their validation are in ``model.arch_fields`` (``ArchFields``); which HF ``config.json`` keys each
family reads and writes is in ``model.arch_hf``, the Megatron-LM ``args`` mapping in ``model.arch_megatron``. This
module joins them: both mappings take an ``ArchFields`` and neither imports this module.

Supported families: Llama (incl. SmolLM2), Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), SmolLM3 (Llama
with RoPE skipped on every 4th layer, "NoPE"), and Qwen3-MoE (Qwen3 attention, every MLP a top-k routed mixture
of SwiGLU experts, no shared expert).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_pz.model import arch_hf, arch_megatron
from megatron_pz.model.arch_fields import FAMILIES, ArchFields
from megatron_pz.model.arch_hf import SUPPORTED_MODEL_TYPES

__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "ArchFields", "ModelArch"]


@dataclass
class ModelArch(ArchFields):
    """Architecture hyper-parameters of a GPT-style decoder (Llama/Qwen2/Qwen3/SmolLM3/Qwen3-MoE).

    Its fields, derived sizes, validation and ``to_dict``/``from_dict`` come from ``ArchFields``; this class adds
    the HF ``config.json`` and Megatron-LM ``args`` formats.
    """

    # ------------------------------------------------------------------ HF (keys per family: model.arch_hf)
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | str | Path) -> "ModelArch":
        """Read an HF ``config.json`` (dict, file or model folder)."""
        return cls(**arch_hf.arch_fields_from_hf_config(cfg))

    def to_hf_config(self) -> dict[str, Any]:
        """An HF config.json for this architecture (the stored original, refreshed from our fields)."""
        return arch_hf.hf_config_of(self)

    # ------------------------------------------------------------------ Megatron-LM args (model.arch_megatron)
    def megatron_lm_extra_args(self) -> dict[str, Any]:
        """Megatron-LM args beyond the Llama-style ones (as --no-rope-freq, --num-experts, ... set them)."""
        return arch_megatron.megatron_lm_extra_args(self)

    @classmethod
    def from_megatron_args(cls, args: Any, vocab_size: int | None = None) -> "ModelArch":
        """Read the architecture from the ``args`` Namespace Megatron-LM stores in its checkpoints.

        ``vocab_size``: the tokenizer's true vocabulary (Megatron-LM stores only the padded size); when
        omitted, the padded size is taken as the vocabulary.
        """
        return cls(**arch_megatron.arch_fields_from_megatron_args(args, vocab_size))
