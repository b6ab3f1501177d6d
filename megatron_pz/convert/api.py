"""HF safetensors <-> Megatron ``torch_dist`` checkpoints (what ``megatron-pz convert`` runs).

``hf_to_mcore`` builds the Megatron model at the requested TP x PP (x EP for MoE models), spawning a local
process group when not already running under torchrun/srun, lets each rank read only its slice of the HF
tensors, and saves collectively. The result reshards on load, so the TP/PP/EP chosen here only sets how the
save is split.
``mcore_to_hf`` loads a checkpoint (ours or Megatron-LM's) into the current world and writes an HF folder.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz import dtypes
from megatron_pz.convert import mapping
from megatron_pz.convert.bridge import gather_hf_state_dict, load_hf_into_model
from megatron_pz.convert.hf_io import HFCheckpoint, aux_files, save_hf_folder
from megatron_pz.errors import CheckpointError, ConfigError
from megatron_pz.io import atomic_dir
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.context import extend_context
from megatron_pz.model.provider import ModelConfig, build_model
from megatron_pz.parallel import ParallelConfig, destroy_distributed, init_distributed, is_rank0, spawn_local

logger = logging.getLogger(__name__)


def _conversion_model_config(dtype: str) -> ModelConfig:
    # Random init is wasted work (every parameter is overwritten) and slow on CPU for large models.
    return ModelConfig(dtype=dtype, transformer_impl="local",
                       transformer_overrides={"perform_initialization": False})


def _short_dtype(name: str) -> str:
    """fp32 / bf16 / fp16 for either spelling; ConfigError naming the choices otherwise."""
    try:
        return dtypes.short_name(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _source_dtype(hf: HFCheckpoint) -> str:
    """The dtype the HF weights are stored in; fp32 for anything outside the table (e.g. fp64)."""
    try:
        return dtypes.short_name(hf.first_dtype())
    except ValueError:
        return "fp32"


def _running_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def hf_to_mcore(src: str | Path, dst: str | Path, tp: int = 1, pp: int = 1, dtype: str | None = None,
                iteration: int = 0, ep: int = 1) -> Path:
    """Convert an HF folder into a Megatron checkpoint root ``dst`` (tracker + iter_NNNNNNN).

    ``ep``: expert-parallel size of the save (MoE models); the conversion world has TP x PP x EP ranks.
    """
    hf = HFCheckpoint(src)
    arch = ModelArch.from_hf_config(hf.config())
    arch.validate_parallel(tp, pp, ep=ep)
    missing = [n for n in mapping.hf_names(arch) if n not in hf]
    if missing:
        raise CheckpointError(f"HF checkpoint {src} lacks tensors {missing[:5]} "
                              f"({len(missing)} missing) for a {arch.family} model")
    dtype = _short_dtype(dtype) if dtype else _source_dtype(hf)
    # Expert layers need ETP x EP ranks per stage (ETP = TP here); attention sees the extra ranks as DP.
    world = tp * pp * ep
    job = (str(src), str(dst), tp, pp, dtype, iteration, ep)
    if world == 1 and not _running_distributed():
        # A world of one in this process, torn down afterwards: the caller is left with no process group.
        try:
            _hf_to_mcore_rank(*job)
        finally:
            destroy_distributed()
    else:
        # A world of its own, also when the caller already has one (the trainer's rank 0 converting the
        # SmolLM2 cache at TP=2): re-initialising Megatron's groups in the caller's world would replace its
        # layout, and on one rank only.
        spawn_local(_hf_to_mcore_rank, world, job)
    return Path(dst)


def _hf_to_mcore_rank(src: str, dst: str, tp: int, pp: int, dtype: str, iteration: int, ep: int = 1) -> None:
    hf = HFCheckpoint(src)
    arch = ModelArch.from_hf_config(hf.config())
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep)
    init_distributed(parallel)
    # training=False: no forward runs here, so an MoE model at TP > 1 needs no sequence parallelism.
    model = build_model(arch, _conversion_model_config(dtype), parallel, training=False)
    load_hf_into_model(model, hf.get, arch)
    if is_rank0():
        with atomic_dir(Path(dst) / ckpt.HF_AUX_DIR) as tmp:
            for f in aux_files(src):
                shutil.copy2(f, tmp / f.name)
    ckpt.save(dst, iteration, model, arch, meta={"source": {"hf": str(Path(src).resolve())}})


def hf_aux_dir(root: Path) -> Path | None:
    """The tokenizer / generation-config files that go with a checkpoint root: ``<root>/hf_tokenizer`` (written by
    ``hf_to_mcore``) or, for a training run's ``checkpoints/``, the run's ``hf_meta/``; None if neither exists."""
    for cand in (root / ckpt.HF_AUX_DIR, root.parent / ckpt.RUN_HF_META_DIR):
        if cand.is_dir():
            return cand
    return None


def mcore_to_hf(src: str | Path, dst: str | Path, dtype: str | None = None, vocab_size: int | None = None,
                allow_pickle: bool = False, max_shard_bytes: int = 5 * 1024**3,
                tokenizer: str | Path | None = None, rope_linear_factor: float | None = None) -> Path:
    """Export a Megatron checkpoint (ours or Megatron-LM's) to an HF safetensors folder.

    Only the true vocabulary's rows are written (``checkpoint.vocab``: ``vocab_size``, else the saved
    ``args.vocab_size``, else the length of ``tokenizer`` or of the tokenizer the checkpoint carries or names).
    Inside a caller's distributed world every rank takes part (the model is built in the caller's layout and
    gathered to global rank 0). Without one it runs in a world of one, torn down before it returns.
    ``rope_linear_factor``: write a config that runs the model at that many times its context with linear
    position interpolation (``model.context``), as a run with ``policy.rope_scaling`` does.
    """
    info = ckpt.resolve(src)
    arch = ckpt.read_arch(src, vocab_size=vocab_size, allow_pickle=allow_pickle, tokenizer=tokenizer)
    arch = extend_context(arch, rope_linear_factor, key="--rope-linear-factor")
    dtype = _short_dtype(dtype or info.meta.get("saved_with", {}).get("dtype", "float32"))
    aux = _aux_source(info, tokenizer, allow_pickle)
    if _running_distributed():
        _mcore_to_hf_rank(info, src, dst, arch, dtype, max_shard_bytes, aux)
        torch.distributed.barrier()
        return Path(dst)
    init_distributed(ParallelConfig())
    try:
        _mcore_to_hf_rank(info, src, dst, arch, dtype, max_shard_bytes, aux)
    finally:
        destroy_distributed()
    return Path(dst)


def _aux_source(info: ckpt.CheckpointInfo, tokenizer: str | Path | None, allow_pickle: bool) -> Path | None:
    """The folder whose tokenizer / generation-config files go into the export: the given tokenizer folder,
    else the checkpoint's own (``hf_aux_dir``), else the local tokenizer folder Megatron-LM's args name."""
    if tokenizer is not None and Path(tokenizer).is_dir():
        return Path(tokenizer)
    aux = hf_aux_dir(info.root)
    if aux is not None or info.meta:
        return aux
    found = ckpt.tokenizer_path(info, ckpt.load_common(info.iter_dir, allow_pickle).get("args"))
    return found if found is not None and found.is_dir() else None


def _mcore_to_hf_rank(info, src, dst, arch: ModelArch, dtype: str, max_shard_bytes: int, aux: Path | None) -> None:
    model = build_model(arch, _conversion_model_config(dtype), training=False)
    ckpt.load(src, model, arch)
    # Cast on export: some modules keep fp32 parameters in a bf16 model (the local spec's RMSNorm).
    state = gather_hf_state_dict(model, arch, dtype=dtypes.torch_dtype(dtype))
    if state is not None:  # global rank 0
        cfg = arch.to_hf_config()
        # transformers>=5 writes "dtype"; older versions "torch_dtype". Keep whichever the source used.
        cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = dtypes.long_name(dtype)
        save_hf_folder(dst, state.items(), cfg, copy_from=aux_files(aux) if aux is not None else (),
                       max_shard_bytes=max_shard_bytes)
