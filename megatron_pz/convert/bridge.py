"""Move weights between HF tensors and a live, possibly TP/PP-sharded Megatron model.

* ``load_hf_into_model``: each rank reads only the HF tensors its shard needs and copies its slice in.
* ``iter_hf_tensors``: gathers this PP stage's parameters across TP and yields them under HF names
  (used by export to HF and by weight sync to the rollout engine).
* ``gather_hf_state_dict``: the whole HF state dict on global rank 0 (PP stages sent to it).

The global layer index of each decoder layer comes from the layer itself (``layer_number``), so uneven
pipeline splits work and nothing here computes layer offsets from ranks.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from megatron_pz.convert import mapping
from megatron_pz.errors import CheckpointError
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.provider import unwrap


def _tp_info() -> tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


def named_canonical_params(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, canonical full name, parameter) for every parameter of one model chunk."""
    model = unwrap(model)
    offsets: dict[int, int] = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for local_idx, layer in enumerate(decoder.layers):
            # layer_number is 1-based and global across pipeline stages.
            offsets[local_idx] = layer.layer_number - 1 - local_idx
    for name, param in model.named_parameters():
        offset = 0
        if name.startswith("decoder.layers."):
            offset = offsets[int(name.split(".")[2])]
        yield name, mapping.canonical_name(name, offset), param


@torch.no_grad()
def load_hf_into_model(model_chunks: list[torch.nn.Module], get_hf: Callable[[str], torch.Tensor],
                       arch: ModelArch) -> None:
    """Copy HF weights into this rank's shards. ``get_hf(name)`` returns a full HF tensor."""
    tp_rank, tp_size, _ = _tp_info()
    padded = arch.padded_vocab_size(tp_size)
    for chunk in model_chunks:
        for local, canonical, param in named_canonical_params(chunk):
            full = mapping.to_megatron(canonical, get_hf, arch, padded)
            shard = mapping.shard_tp(canonical, full, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise CheckpointError(
                    f"shape mismatch for {canonical} ({local}): HF weights give {tuple(shard.shape)} on "
                    f"TP rank {tp_rank}/{tp_size}, the model has {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))


@torch.no_grad()
def iter_hf_tensors(model_chunks: list[torch.nn.Module], arch: ModelArch,
                    dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the parameters of this PP stage, gathered across TP.

    Every TP rank of the stage takes part in the gathers and receives the same tensors. With tied
    embeddings the last stage's copy of the output layer is skipped (HF stores it once).
    """
    import torch.distributed as dist

    _, tp_size, tp_group = _tp_info()
    for chunk in model_chunks:
        for _, canonical, param in named_canonical_params(chunk):
            if canonical == "output_layer.weight" and arch.tie_word_embeddings:
                continue
            local = param.detach()
            if tp_size > 1 and mapping._split_kind(canonical) is not None:
                shards = [torch.empty_like(local) for _ in range(tp_size)]
                dist.all_gather(shards, local.contiguous(), group=tp_group)
                full = mapping.unshard_tp(canonical, shards)
            else:
                full = local
            for name, t in mapping.to_hf(canonical, full, arch).items():
                yield name, (t.to(dtype) if dtype is not None else t).cpu().contiguous()


def gather_hf_state_dict(model_chunks: list[torch.nn.Module], arch: ModelArch,
                         dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The full HF state dict on global rank 0 (None elsewhere). Collective over all ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    local = dict(iter_hf_tensors(model_chunks, arch, dtype))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    # One sender per PP stage: TP rank 0 of DP rank 0. Stage dicts are gathered over the PP group.
    is_sender = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    out: dict[str, torch.Tensor] | None = None
    if is_sender:
        pp_group = ps.get_pipeline_model_parallel_group()
        pp_size = ps.get_pipeline_model_parallel_world_size()
        parts: list = [None] * pp_size
        if pp_size > 1:
            dist.all_gather_object(parts, local, group=pp_group)
        else:
            parts = [local]
        if dist.get_rank() == 0:
            out = {}
            for p in parts:
                out.update(p)
    dist.barrier()
    return out
