"""Save and load model chunks (+ optimizer, + any extra sharded state) with ``megatron.core.dist_checkpointing``.

Each iteration folder is a ``torch_dist`` checkpoint, so it reshards on load (saved at TP=2, loaded at TP=1
or PP=2) and Megatron-LM can read it (its ``common.pt`` carries Megatron-LM-style ``args``). We add
``megatron_pz.json`` (architecture + the caller's run state, plain JSON).

Atomicity: ranks write into ``ROOT/.iter_NNNNNNN.tmp``; rank 0 renames it into place and only then
rewrites the tracker file (via a temp file + rename, ``megatron_pz.io``). A crash at any point leaves the
previous checkpoint and tracker intact. With ``background=`` (``checkpoint.async_save``) the shard writes run
in a forked process and the rename and tracker update become the save's finalize step, run once every rank's
write is done: the same guarantee, with the write off the step's critical path.
"""
from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_pz import dtypes, mcore_compat
from megatron_pz.checkpoint.layout import (CHECKPOINT_VERSION, FIX_AND_RESUME, META, TRACKER, CheckpointInfo,
                                           iter_dir_name, megatron_lm_args, resolve, tracker_line, write_error)
from megatron_pz.checkpoint.optimizer_state import materialise_optimizer_state, unshare_adam_steps
from megatron_pz.checkpoint.validate import validate_files, validate_shapes
from megatron_pz.errors import CheckpointError
from megatron_pz.io import atomic_replace, atomic_write_text, fsync_tree
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.provider import unwrap

if TYPE_CHECKING:
    from megatron_pz.checkpoint.background import BackgroundSaves

# Distributed-optimizer state layout (Megatron-LM's default for torch_dist): every rank saves and loads its own
# buffers in parallel; reshards across DP. Recorded in megatron_pz.json so a load asks for the same layout.
OPTIM_SHARDING = "dp_reshardable"


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """Megatron-LM's keys: "model" for one chunk, "model0", "model1", ... with virtual pipelining."""
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


def _tp_rank_size() -> tuple[int, int]:
    """(TP rank, TP size) of this rank; (0, 1) without Megatron's model-parallel groups."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def save(root: str | os.PathLike, iteration: int, model_chunks: list[torch.nn.Module], arch: ModelArch, *,
         optimizer: Any | None = None, extra_sharded: dict[str, Any] | None = None,
         meta: dict[str, Any] | None = None, keep_last: int | None = None,
         background: BackgroundSaves | None = None, publish_now: bool = True) -> Path:
    """Save a checkpoint collectively (all ranks call it). Returns the iteration folder.

    ``optimizer``: a Megatron optimizer whose (sharded) state is saved under "optimizer", as Megatron-LM does.
    ``extra_sharded``: more sharded state (e.g. ShardedObjects) merged into the state dict.
    ``meta``: JSON-serialisable run state written to megatron_pz.json (data position, step, version...).
    ``keep_last``: delete older iteration folders beyond this many (never the one just written).
    ``background``: write the shards in the background (it must have no write in flight): the returned folder
    exists, and the tracker names it, only once ``background.poll()`` / ``wait()`` has finalized the save.
    ``publish_now=False``: write and make durable, but leave the folder under its temporary name and the tracker
    where it is until the caller's ``publish(root, iteration, keep_last)`` (a trainer publishes a step's
    checkpoint only after that step's log lines are written, so a resumed run never skips a step's lines).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    root = Path(root)
    final = root / iter_dir_name(iteration)
    tmp = root / f".{final.name}.tmp"
    if background is not None and background.in_flight:
        raise CheckpointError(f"cannot start checkpoint {final.name} while {background.in_flight} is still being "
                              f"written; wait for it first (BackgroundSaves.wait)")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of the same iteration
        tmp.mkdir()
    _barrier()
    _, tp = _tp_rank_size()
    pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    dtype = next(unwrap(model_chunks[0]).parameters()).dtype
    state: dict[str, Any] = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata={"distrib_optim_sharding_type": OPTIM_SHARDING})
    state.update(extra_sharded or {})
    state.update(checkpoint_version=CHECKPOINT_VERSION, iteration=iteration,
                 args=megatron_lm_args(arch, tp, pp, dtype))
    try:
        if background is None:
            mcore_compat.dist_save(state, tmp)  # common.pt under every Megatron-Core release (0.16 readers need it)
            request = None
        else:
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        if _rank() == 0:
            # Written now in both modes: the run state of this step, whatever the trainer does while shards are
            # written.
            (tmp / META).write_text(json.dumps(
                {"format": "megatron_pz/1", "iteration": iteration, "arch": arch.to_dict(),
                 "saved_with": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                "dtype": dtypes.long_name(dtype)},
                 "optimizer": {"distrib_optim_sharding_type": OPTIM_SHARDING} if optimizer is not None else None,
                 **(meta or {})}, indent=2))
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        error = write_error(exc)
        if error is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a torn folder would only hold on to the space that ran out
        raise CheckpointError(f"could not write checkpoint {final.name} to {tmp}: {error}; {tracker_line(root)}: "
                              f"{FIX_AND_RESUME}") from exc
    publish = partial(_publish, root, tmp, final, iteration, keep_last) if publish_now else partial(_durable, tmp)
    if background is None:
        _barrier()
        publish()
    else:
        # after Megatron's own finalize (which writes .metadata and metadata.json once all shards are written);
        # under 0.17+ the common state is in the shards, so its common.pt copy for 0.16 readers waits for them too
        request.add_finalize_fn(partial(_legacy_common_then, tmp, publish))
        background.schedule(request, final.name, folder=tmp)
    return final


def _legacy_common_then(tmp: Path, publish: Any) -> None:
    if _rank() == 0:
        mcore_compat.write_legacy_common(tmp)
    publish()


def publish(root: str | os.PathLike, iteration: int, keep_last: int | None = None) -> Path:
    """Collective: publish a checkpoint that ``save(..., publish_now=False)`` wrote (and whose background write,
    if any, is finalized): rename it into place, point the tracker at it, prune beyond ``keep_last``."""
    root = Path(root)
    final = root / iter_dir_name(iteration)
    tmp = root / f".{final.name}.tmp"
    if _rank() == 0 and not tmp.is_dir():
        raise CheckpointError(f"cannot publish checkpoint {final.name}: {tmp} is not there (was it saved with "
                              f"publish_now=False?)")
    _barrier()
    _publish(root, tmp, final, iteration, keep_last, durable=True)
    return final


def _durable(tmp: Path) -> None:
    """Collective: rank 0 fsyncs every file of ``tmp`` (the write half of a publish)."""
    if _rank() == 0:
        fsync_tree(tmp)
    _barrier()


def _publish(root: Path, tmp: Path, final: Path, iteration: int, keep_last: int | None,
             durable: bool = False) -> None:
    """Collective, once every rank's shards are written: rank 0 makes ``tmp`` durable (unless ``durable``
    already), renames it to ``final``, then points the tracker at it and drops old iterations beyond ``keep_last``."""
    if _rank() == 0:
        if not durable:
            fsync_tree(tmp)
        if final.exists():  # re-saving an iteration: move the old one aside only once the new one is whole
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            atomic_replace(final, old)
            atomic_replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            atomic_replace(tmp, final)
        atomic_write_text(root / TRACKER, f"{iteration}\n")
        if keep_last:
            olds = sorted(p for p in root.glob("iter_*") if p.is_dir() and p != final)
            for p in olds[: max(0, len(olds) - (keep_last - 1))]:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()


def load(path: str | os.PathLike, model_chunks: list[torch.nn.Module], arch: ModelArch, *,
         optimizer: Any | None = None, extra_sharded: dict[str, Any] | None = None,
         strict: bool = True) -> tuple[CheckpointInfo, dict]:
    """Load model (and optionally more sharded state) from a checkpoint at any TP/PP. Collective.

    ``optimizer``: also restore its state (the checkpoint must hold one; padded vocab sizes must agree).
    Returns (info, loaded state dict). Vocab-sized tensors saved with a different padding (another TP
    size or ``make_vocab_size_divisible_by``) are re-padded: real rows are kept, padded rows zeroed.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    info = resolve(path)
    validate_files(info.iter_dir)
    sharded = model_sharded_state_dict(model_chunks)
    vocab_fix = validate_shapes(info.iter_dir, sharded)
    repad: dict[tuple[str, str], torch.Tensor] = {}
    # The whole tensor is replicated over this stage's TP and DP ranks: exactly one of them (TP0, DP0)
    # must be the "main" replica for Megatron's access-integrity check.
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
        materialise_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=saved)
    state.update(extra_sharded or {})
    try:
        loaded = mcore_compat.dist_load(state, info.iter_dir)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"failed to load {info.iter_dir}: {exc.__class__.__name__}: "
                              f"{str(exc)[:500]} (truncated or corrupt shard file?)") from None
    tp_rank, tp_size = _tp_rank_size()
    for (mkey, local_name), buf in repad.items():
        full = loaded[mkey][local_name]  # [padded_vocab_saved, hidden]
        rows = min(arch.vocab_size, full.shape[0])
        padded = full.new_zeros(arch.padded_vocab_size(tp_size), full.shape[1])
        padded[:rows] = full[:rows]
        # Both vocab tensors are column-parallel: TP rank r holds the r-th block of rows (convert.mapping's "col").
        loaded[mkey][local_name] = torch.chunk(padded, tp_size, dim=0)[tp_rank]
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
