"""Megatron checkpoints in Megatron-LM's layout: ``ROOT/latest_checkpointed_iteration.txt`` + ``ROOT/iter_NNNNNNN/``.

Each iteration folder is a ``torch_dist`` checkpoint written by ``megatron.core.dist_checkpointing``, so it
reshards on load (saved at TP=2, loaded at TP=1 or PP=2) and Megatron-LM can read it (its ``common.pt``
carries Megatron-LM-style ``args``). We add ``megatron_pz.json`` (architecture + run state, plain JSON).

Atomicity: ranks write into ``ROOT/.iter_NNNNNNN.tmp``; rank 0 renames it into place and only then
rewrites the tracker file (via a temp file + ``os.replace``). A crash at any point leaves the previous
checkpoint and tracker intact.

Safety: ``common.pt`` is read with ``torch.load(weights_only=True)``; Megatron-Core allow-lists the plain
classes Megatron-LM stores there (``argparse.Namespace``, ...). A checkpoint that needs anything else is
refused with a message naming the file, unless the caller passes ``allow_pickle=True`` for that path.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_pz.convert import mapping
from megatron_pz.convert.hf_io import atomic_write_text
from megatron_pz.errors import CheckpointError
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.provider import unwrap

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
# Distributed-optimizer state layout (Megatron-LM's default for torch_dist): every rank saves and loads its own
# buffers in parallel; reshards across DP. Recorded in megatron_pz.json so a load asks for the same layout.
OPTIM_SHARDING = "dp_reshardable"
META = "megatron_pz.json"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


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
    """The non-sharded part (common.pt) of a torch_dist checkpoint, safely."""
    import megatron.core  # noqa: F401  (registers Megatron's safe globals for weights_only loading)

    path = iter_dir / "common.pt"
    if not path.exists():
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} contains objects outside the weights_only allow-list ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0][:200]}). It can only be read with pickle; if you trust this "
                f"file, pass allow_pickle=True / --allow-pickle") from None
        logger.warning("loading %s with pickle (weights_only=False) because allow_pickle was given", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def read_arch(path: str | os.PathLike, vocab_size: int | None = None, allow_pickle: bool = False) -> ModelArch:
    """The architecture of a checkpoint: from megatron_pz.json, else from Megatron-LM's saved args."""
    info = resolve(path)
    if "arch" in info.meta:
        return ModelArch.from_dict(info.meta["arch"])
    common = load_common(info.iter_dir, allow_pickle)
    if "args" not in common:
        raise CheckpointError(f"{info.iter_dir} has neither {META} nor Megatron-LM args in common.pt; "
                              f"cannot tell the architecture")
    return ModelArch.from_megatron_args(common["args"], vocab_size=vocab_size)


def megatron_lm_args(arch: ModelArch, tp: int, pp: int, dtype: torch.dtype) -> argparse.Namespace:
    """The subset of Megatron-LM's argparse namespace that describes the model (read by Megatron-LM)."""
    return argparse.Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, kv_channels=arch.head_dim,
        padded_vocab_size=arch.padded_vocab_size(tp), make_vocab_size_divisible_by=arch.make_vocab_size_divisible_by,
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


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    # Megatron-LM's keys: "model" for one chunk, "model0", "model1", ... with virtual pipelining.
    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(model_chunks)}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_initialized() else None


def _barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else 0


def save(root: str | os.PathLike, iteration: int, model_chunks: list[torch.nn.Module], arch: ModelArch, *,
         optimizer: Any | None = None, extra_sharded: dict[str, Any] | None = None,
         meta: dict[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Save a checkpoint collectively (all ranks call it). Returns the iteration folder.

    ``optimizer``: a Megatron optimizer whose (sharded) state is saved under "optimizer", as Megatron-LM does.
    ``extra_sharded``: more sharded state (e.g. ShardedObjects) merged into the state dict.
    ``meta``: JSON-serialisable run state written to megatron_pz.json (data position, step, version...).
    ``keep_last``: delete older iteration folders beyond this many (never the one just written).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    root = Path(root)
    final = root / iter_dir_name(iteration)
    tmp = root / f".{final.name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of the same iteration
        tmp.mkdir()
    _barrier()
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    dtype = next(unwrap(model_chunks[0]).parameters()).dtype
    state: dict[str, Any] = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata={"distrib_optim_sharding_type": OPTIM_SHARDING})
    state.update(extra_sharded or {})
    state.update(checkpoint_version=CHECKPOINT_VERSION, iteration=iteration,
                 args=megatron_lm_args(arch, tp, pp, dtype))
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / META).write_text(json.dumps(
            {"format": "megatron_pz/1", "iteration": iteration, "arch": arch.to_dict(),
             "saved_with": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                            "dtype": str(dtype).replace("torch.", "")},
             "optimizer": {"distrib_optim_sharding_type": OPTIM_SHARDING} if optimizer is not None else None,
             **(meta or {})}, indent=2))
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # re-saving an iteration: move the old one aside only once the new one is whole
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_text(root / TRACKER, f"{iteration}\n")
        if keep_last:
            olds = sorted(p for p in root.glob("iter_*") if p.is_dir() and p != final)
            for p in olds[: max(0, len(olds) - (keep_last - 1))]:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def validate_files(iter_dir: Path) -> None:
    """Every byte range the checkpoint's ``.metadata`` lists must exist: names a missing/truncated file.

    Cheap (stat calls only) and catches interrupted copies before ranks start a collective load that
    would otherwise die with an opaque gloo/NCCL error on a peer.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(iter_dir)).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"cannot read {iter_dir / '.metadata'}: {exc}") from None
    need: dict[str, int] = {}
    owner: dict[str, str] = {}
    for index, info in md.storage_data.items():
        end = info.offset + info.length
        if end > need.get(info.relative_path, -1):
            need[info.relative_path], owner[info.relative_path] = end, index.fqn
    for rel, end in sorted(need.items()):
        f = iter_dir / rel
        if not f.exists():
            raise CheckpointError(f"checkpoint shard file {f} is missing (it holds {owner[rel]!r} and more)")
        size = f.stat().st_size
        if size < end:
            raise CheckpointError(f"checkpoint shard file {f} is truncated: {size} bytes, the metadata needs "
                                  f"{end} (tensor {owner[rel]!r})")


def _validate_shapes(iter_dir: Path, sharded: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Compare global shapes of the model's sharded tensors with the checkpoint's metadata.

    Returns {key: checkpoint_shape} for the vocab-sized tensors whose padding differs (handled by the
    caller); raises CheckpointError naming the first other mismatch or missing key.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    try:
        ckpt_meta = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    except Exception as exc:
        raise CheckpointError(f"cannot read tensor metadata of {iter_dir}: {exc}") from None
    vocab_mismatch: dict[str, tuple[int, ...]] = {}
    for st in nested_values(sharded):
        if not isinstance(st, ShardedTensor):
            continue
        if st.key not in ckpt_meta:
            raise CheckpointError(f"checkpoint {iter_dir} has no tensor {st.key!r} that the model needs "
                                  f"(different architecture?)")
        have = tuple(ckpt_meta[st.key].global_shape)
        want = tuple(st.global_shape)
        if have != want:
            if st.key in _VOCAB_KEYS and have[1:] == want[1:]:
                vocab_mismatch[st.key] = have
                continue
            raise CheckpointError(f"shape mismatch for {st.key} in {iter_dir}: checkpoint {have}, "
                                  f"model {want}")
    return vocab_mismatch


def load(path: str | os.PathLike, model_chunks: list[torch.nn.Module], arch: ModelArch, *,
         optimizer: Any | None = None, extra_sharded: dict[str, Any] | None = None,
         strict: bool = True) -> tuple[CheckpointInfo, dict]:
    """Load model (and optionally more sharded state) from a checkpoint at any TP/PP. Collective.

    ``optimizer``: also restore its state (the checkpoint must hold one; padded vocab sizes must agree).
    Returns (info, loaded state dict). Vocab-sized tensors saved with a different padding (another TP
    size or ``make_vocab_size_divisible_by``) are re-padded: real rows are kept, padded rows zeroed.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    info = resolve(path)
    validate_files(info.iter_dir)
    sharded = _model_sharded_state_dict(model_chunks)
    vocab_fix = _validate_shapes(info.iter_dir, sharded)
    repad: dict[tuple[str, str], torch.Tensor] = {}
    # The whole tensor is replicated over this stage's TP and DP ranks: exactly one of them (TP0, DP0)
    # must be the "main" replica for Megatron's access-integrity check.
    from megatron.core import parallel_state as ps

    replica_id = (0, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True))
    for mkey, msd in sharded.items():
        for local_name, st in list(msd.items()):
            if isinstance(st, ShardedTensor) and st.key in vocab_fix:
                # Load the checkpoint's whole (differently padded) tensor on every rank, re-pad below.
                buf = torch.empty(vocab_fix[st.key], dtype=st.data.dtype, device=st.data.device)
                msd[local_name] = ShardedTensor.from_rank_offsets(st.key, buf, replica_id=replica_id)
                repad[(mkey, local_name)] = buf
    state = dict(sharded)
    if optimizer is not None:
        if vocab_fix:
            raise CheckpointError(f"cannot restore optimizer state from {info.iter_dir}: it was saved with another "
                                  f"padded vocabulary size ({vocab_fix}); load the model only, or keep the TP size")
        saved = info.meta.get("optimizer")
        if not saved:
            raise CheckpointError(f"{info.iter_dir} holds no optimizer state (a converted or model-only checkpoint); "
                                  f"start a new run from it instead of resuming")
        _materialise_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=saved)
    state.update(extra_sharded or {})
    try:
        loaded = dist_checkpointing.load(state, str(info.iter_dir))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"failed to load {info.iter_dir}: {exc.__class__.__name__}: "
                              f"{str(exc)[:500]} (truncated or corrupt shard file?)") from None
    from megatron_pz.convert.bridge import _tp_info

    tp_rank, tp_size, _ = _tp_info()
    for (mkey, local_name), buf in repad.items():
        full = loaded[mkey][local_name]
        rows = min(arch.vocab_size, full.shape[0])
        padded = full.new_zeros(arch.padded_vocab_size(tp_size), full.shape[1])
        padded[:rows] = full[:rows]
        canonical = "embedding.word_embeddings.weight" if "embedding" in local_name else "output_layer.weight"
        loaded[mkey][local_name] = mapping.shard_tp(canonical, padded, tp_rank, tp_size)
    for i, m in enumerate(model_chunks):
        mkey = "model" if len(model_chunks) == 1 else f"model{i}"
        result = unwrap(m).load_state_dict(loaded[mkey], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if strict and missing:
            raise CheckpointError(f"checkpoint {info.iter_dir} lacks model tensors: {missing[:5]}")
    if optimizer is not None:
        with torch.no_grad():  # in-place copies into fp32 main params, which are views of model leaves
            optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
    return info, loaded


def _materialise_optimizer_state(optimizer: Any) -> None:
    """A fresh torch AdamW has no per-parameter state, and without Apex/TE Megatron's DistributedOptimizer
    cannot describe (or load into) an empty state. Run Megatron's own zero-gradient dummy step first; the
    parameters it touches are overwritten by the load that follows."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if inner is not None and len(inner.state) == 0 and hasattr(o, "_init_optimizer_states_with_dummy_values"):
            with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
                o._init_optimizer_states_with_dummy_values()


def unshare_adam_steps(optimizer: Any) -> int:
    """Give every parameter's Adam state its own ``step`` tensor; returns how many were replaced.

    Without Apex/TE, Megatron's ``DistributedOptimizer.load_state_dict`` assigns *one* step tensor to every
    parameter state. torch's foreach AdamW then increments that shared tensor once per parameter, so after a
    resume the bias correction runs N times too fast (and the next save trips Megatron's equal-steps assert).
    """
    inners = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    replaced = 0
    for inner in inners:
        for st in getattr(inner, "state", {}).values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
                replaced += 1
    return replaced
