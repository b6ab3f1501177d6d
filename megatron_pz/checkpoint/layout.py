"""Megatron-LM's checkpoint folder layout: ``ROOT/latest_checkpointed_iteration.txt`` + ``ROOT/iter_NNNNNNN/``.

Reading only: which iteration folder a path means (``resolve``), the architecture it holds (``read_arch``,
from our ``megatron_pz.json`` or from the Megatron-LM ``args`` in ``common.pt``), and the Megatron-LM
``args`` namespace we write so that Megatron-LM can read our checkpoints (``megatron_lm_args``).

Safety: ``common.pt`` is read with ``torch.load(weights_only=True)``; Megatron-Core allow-lists the plain
classes Megatron-LM stores there (``argparse.Namespace``, ...). A checkpoint that needs anything else is
refused with a message naming the file, unless the caller passes ``allow_pickle=True`` for that path.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_pz.checkpoint.vocab import args_dict, named_tokenizer, true_vocab_size
from megatron_pz.errors import CheckpointError
from megatron_pz.model.arch import ModelArch

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatron_pz.json"  # our run state + architecture, plain JSON, next to the torch_dist files
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version
# Tokenizer and other non-weight HF files travel inside a converted checkpoint root, under this folder.
HF_AUX_DIR = "hf_tokenizer"
# A training run's output folder: its checkpoint root, and its tokenizer + generation config next to it.
RUN_CHECKPOINT_DIR = "checkpoints"
RUN_HF_META_DIR = "hf_meta"


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass
class CheckpointInfo:
    root: Path  # folder holding the tracker (== iter_dir.parent)
    iter_dir: Path
    iteration: int
    meta: dict[str, Any] = field(default_factory=dict)  # megatron_pz.json, {} for Megatron-LM checkpoints


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / TRACKER).exists() or (p / "metadata.json").exists()


def resolve(path: str | os.PathLike) -> CheckpointInfo:
    """Find the iteration folder of a checkpoint root (via the tracker) or of an iteration folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if (p / TRACKER).exists():
        text = (p / TRACKER).read_text().strip()
        if text == "release":
            iter_dir, iteration = p / "release", 0
        else:
            try:
                iteration = int(text)
            except ValueError:
                raise CheckpointError(f"{p / TRACKER} should hold an iteration number or 'release', "
                                      f"found {text[:50]!r}") from None
            iter_dir = p / iter_dir_name(iteration)
        if not iter_dir.is_dir():
            raise CheckpointError(f"{p / TRACKER} points at {iter_dir.name}, which does not exist")
    elif (p / "metadata.json").exists():
        iter_dir = p
        name = p.name
        iteration = int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else 0
    else:
        raise CheckpointError(f"not a Megatron checkpoint: {p} has neither {TRACKER} nor metadata.json")
    for required in ("metadata.json", ".metadata"):
        if not (iter_dir / required).exists():
            raise CheckpointError(f"checkpoint {iter_dir} is incomplete: {required} is missing "
                                  f"(interrupted save or not a torch_dist checkpoint)")
    meta: dict[str, Any] = {}
    if (iter_dir / META).exists():
        try:
            meta = json.loads((iter_dir / META).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{iter_dir / META} is not valid JSON: {exc}") from None
    return CheckpointInfo(root=iter_dir.parent, iter_dir=iter_dir, iteration=iteration, meta=meta)


def load_common(iter_dir: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """The non-sharded part of a torch_dist checkpoint (``common.pt``, or the ``common_state`` object that
    Megatron-Core 0.17+ keeps in the ``.distcp`` files instead; ``mcore_compat.read_common``), safely."""
    from megatron_pz import mcore_compat

    try:
        return mcore_compat.read_common(iter_dir)
    except Exception as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{mcore_compat.common_source(iter_dir)} contains objects outside the weights_only allow-list "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}). It can only be read with pickle; "
                f"if you trust this file, pass allow_pickle=True / --allow-pickle") from None
        logger.warning("loading the common state of %s with pickle (weights_only=False) because allow_pickle was "
                       "given", iter_dir)
        return mcore_compat.read_common(iter_dir, weights_only=False)


def read_arch(path: str | os.PathLike, vocab_size: int | None = None, allow_pickle: bool = False, *,
              tokenizer: str | os.PathLike | None = None, tokenizer_size: int | None = None) -> ModelArch:
    """The architecture of a checkpoint: from megatron_pz.json, else from Megatron-LM's saved args.

    For a Megatron-LM checkpoint the true vocabulary is resolved as ``checkpoint.vocab`` describes: ``vocab_size``
    (explicit), the saved ``args.vocab_size``, ``tokenizer_size`` (len of a tokenizer the caller already loaded),
    the tokenizer at ``tokenizer``, then the one the checkpoint carries or names (``tokenizer_path``).
    """
    info = resolve(path)
    if "arch" in info.meta:
        return ModelArch.from_dict(info.meta["arch"])
    common = load_common(info.iter_dir, allow_pickle)
    if "args" not in common:
        raise CheckpointError(f"{info.iter_dir} has neither {META} nor Megatron-LM args in its common state; "
                              f"cannot tell the architecture")
    args = common["args"]
    source = "the tokenizer"
    needs_tokenizer = vocab_size is None and not args_dict(args).get("vocab_size") and tokenizer_size is None
    if needs_tokenizer:
        tok = Path(tokenizer) if tokenizer else tokenizer_path(info, args)
        if tok is not None:
            from megatron_pz.model.tokenizer import load_tokenizer

            tokenizer_size, source = load_tokenizer(tok).vocab_size, f"the tokenizer at {tok}"
    true = true_vocab_size(args, info.iter_dir, explicit=vocab_size, tokenizer_size=tokenizer_size,
                           tokenizer_from=source)
    return ModelArch.from_megatron_args(args, vocab_size=true)


def tokenizer_path(info: CheckpointInfo, args: Any | None = None) -> Path | None:
    """The tokenizer that travels with a checkpoint: ``<root>/hf_tokenizer`` (written by ``megatron-pz convert``),
    ``<iter_dir>/hf_tokenizer``, a training run's ``hf_meta/`` next to ``checkpoints/``, then the one Megatron-LM's
    ``args`` name (``--tokenizer-model``, when local). None if none of them holds tokenizer files."""
    from megatron_pz.model.tokenizer import has_tokenizer_files

    for cand in (info.root / HF_AUX_DIR, info.iter_dir / HF_AUX_DIR, info.root.parent / RUN_HF_META_DIR):
        if has_tokenizer_files(cand):
            return cand
    return named_tokenizer(args) if args is not None else None


def megatron_lm_args(arch: ModelArch, tp: int, pp: int, dtype: torch.dtype) -> argparse.Namespace:
    """The subset of Megatron-LM's argparse namespace that describes the model (read by Megatron-LM)."""
    return argparse.Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, kv_channels=arch.head_dim,
        padded_vocab_size=arch.padded_vocab_size(tp), vocab_size=arch.vocab_size,
        make_vocab_size_divisible_by=arch.make_vocab_size_divisible_by,
        max_position_embeddings=arch.max_position_embeddings, seq_length=arch.max_position_embeddings,
        position_embedding_type="rope", rotary_base=arch.rope_theta,
        use_rope_scaling=arch.rope_scaling_factor is not None, rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        normalization="RMSNorm", norm_epsilon=arch.norm_eps, swiglu=True,
        untie_embeddings_and_output_weights=not arch.tie_word_embeddings,
        add_qkv_bias=arch.qkv_bias, add_bias_linear=False, qk_layernorm=arch.qk_norm,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, ckpt_format="torch_dist",
        **arch.megatron_lm_extra_args(),  # MoE (Qwen3-MoE) and NoPE (SmolLM3) settings
    )


def write_error(exc: BaseException) -> str | None:
    """The OS error (no space, quota, permissions, I/O) behind a failed checkpoint write, as one line: looked for in
    the exception, its causes, and torch's CheckpointException's per-rank failures, where Megatron's writer
    processes report it as text ("Worker failure: [Errno 28] ..."); None when there is none (a bug)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return str(e)
        found = re.search(r"\[Errno \d+\][^\n]*", str(e))
        if found:
            return found.group(0)
        todo += [e.__cause__, e.__context__]
        for wrapped in (getattr(e, "failures", None) or {}).values():
            todo.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
    return None


FIX_AND_RESUME = "make room there (or fix the cause) and run the same command again to resume"
"""The end of a failed save's message: nothing is lost, the run resumes from the tracker's checkpoint."""


def tracker_line(root: Path) -> str:
    """What a run resumes from after a failed save: the tracker's iteration, or that there is none yet."""
    try:
        return f"the tracker still names iteration {int((root / TRACKER).read_text().strip())}"
    except (OSError, ValueError):
        return "no earlier checkpoint exists"
