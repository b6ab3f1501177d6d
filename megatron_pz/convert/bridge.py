"""Move weights between HF tensors and a live, possibly TP/PP-sharded Megatron model.

* ``load_hf_into_model``: each rank reads only the HF tensors its shard needs and copies its slice in.
* ``iter_hf_tensors``: gathers this PP stage's parameters across TP (experts: across expert-TP, then
  across EP) and yields them under HF names (used by export to HF and by weight sync to the rollout engine).
* ``gather_hf_state_dict``: the whole HF state dict on global rank 0 (PP stages sent to it).
* ``share_hf_params``: point an HF model's parameters at an unsharded Megatron model's own storage (colocated
  rollout at world size 1): views wherever the layouts coincide, fresh tensors only where they do not.

The global layer index of each decoder layer comes from the layer itself (``layer_number``), so uneven
pipeline splits work and nothing here computes layer offsets from ranks. Experts are the exception: EP rank
r holds global experts r*E/EP ... (r+1)*E/EP-1, Megatron's fixed contiguous layout.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def _expert_info() -> tuple[int, int, object, int, int, object]:
    """(expert-TP rank, size, group, EP rank, size, group); trivial without model parallelism."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, None, 0, 1, None
    return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_group(), ps.get_expert_model_parallel_rank(),
            ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_group())


def named_canonical_params(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, canonical full name, parameter) for every parameter of one model chunk."""
    model = unwrap(model)
    offsets: dict[int, int] = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for local_idx, layer in enumerate(decoder.layers):
            # layer_number is 1-based and global across pipeline stages.
            offsets[local_idx] = layer.layer_number - 1 - local_idx
    experts = getattr(getattr(model, "config", None), "num_moe_experts", None)
    expert_offset = 0
    if experts:
        _, _, _, ep_rank, ep_size, _ = _expert_info()
        expert_offset = ep_rank * (experts // ep_size)
    for name, param in model.named_parameters():
        offset = 0
        if name.startswith("decoder.layers."):
            offset = offsets[int(name.split(".")[2])]
        yield name, mapping.canonical_name(name, offset, expert_offset, moe=bool(experts)), param


@torch.no_grad()
def load_hf_into_model(model_chunks: list[torch.nn.Module], get_hf: Callable[[str], torch.Tensor],
                       arch: ModelArch) -> None:
    """Copy HF weights into this rank's shards. ``get_hf(name)`` returns a full HF tensor."""
    tp_rank, tp_size, _ = _tp_info()
    etp_rank, etp_size, _, _, _, _ = _expert_info()
    padded = arch.padded_vocab_size(tp_size)
    for chunk in model_chunks:
        for local, canonical, param in named_canonical_params(chunk):
            full = mapping.to_megatron(canonical, get_hf, arch, padded)
            rank, size = (etp_rank, etp_size) if mapping.is_expert(canonical) else (tp_rank, tp_size)
            shard = mapping.shard_tp(canonical, full, rank, size)
            if shard.shape != param.shape:
                raise CheckpointError(
                    f"shape mismatch for {canonical} ({local}): HF weights give {tuple(shard.shape)} on "
                    f"TP rank {rank}/{size}, the model has {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))


@torch.no_grad()
def iter_hf_tensors(model_chunks: list[torch.nn.Module], arch: ModelArch, dtype: torch.dtype | None = None,
                    of: Callable[[torch.nn.Parameter], torch.Tensor] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the parameters of this PP stage, gathered across TP.

    ``of``: what to take of each parameter, laid out like it (default: the parameter; e.g. its ``main_grad``
    to gather gradients under HF names).

    Every rank of the stage takes part in the gathers and receives the same tensors: experts are gathered
    across the expert-TP group and then across the EP group, so each rank yields all experts. With tied
    embeddings the last stage's copy of the output layer is skipped (HF stores it once).
    """
    _, tp_size, tp_group = _tp_info()
    _, etp_size, etp_group, _, ep_size, ep_group = _expert_info()
    for chunk in model_chunks:
        experts = getattr(unwrap(chunk).config, "num_moe_experts", None) or 0
        for _, canonical, param in named_canonical_params(chunk):
            if canonical == "output_layer.weight" and arch.tie_word_embeddings:
                continue
            value = (param if of is None else of(param)).detach()
            if not mapping.is_expert(canonical):
                full = _gather(canonical, value, tp_size, tp_group)
                fulls = [(canonical, full)]
            else:
                full = _gather(canonical, value, etp_size, etp_group)
                # Local expert l of EP rank r is global expert r*E/EP + l; this rank's own index fixes l.
                local = mapping.expert_index(canonical) % (experts // ep_size)
                fulls = [(mapping.with_expert_index(canonical, r * (experts // ep_size) + local), t)
                         for r, t in enumerate(_all_gather(full, ep_size, ep_group))]
            for name_c, t_full in fulls:
                for name, t in mapping.to_hf(name_c, t_full, arch).items():
                    yield name, (t.to(dtype) if dtype is not None else t).cpu().contiguous()


def _all_gather(t: torch.Tensor, size: int, group: object) -> list[torch.Tensor]:
    """The tensor of every rank of ``group`` (rank order); [t] without a group."""
    import torch.distributed as dist

    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _gather(canonical: str, local: torch.Tensor, size: int, group: object) -> torch.Tensor:
    """The full tensor from this rank's TP (or expert-TP) shard."""
    if size == 1 or mapping.tp_split_kind(canonical) is None:
        return local
    return mapping.unshard_tp(canonical, _all_gather(local, size, group))


def _is_view(t: torch.Tensor) -> bool:
    """Whether ``t`` shares a larger storage (pickling it would write all of that storage)."""
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


def gather_hf_state_dict(model_chunks: list[torch.nn.Module], arch: ModelArch, dtype: torch.dtype | None = None,
                         of: Callable[[torch.nn.Parameter], torch.Tensor] | None = None
                         ) -> dict[str, torch.Tensor] | None:
    """The full HF state dict on global rank 0 (None elsewhere). Collective over all ranks. ``of``: as in
    ``iter_hf_tensors`` (it is taken on DP rank 0, so a gradient must be DP-reduced there in full)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(iter_hf_tensors(model_chunks, arch, dtype, of))
    # One sender per PP stage: TP rank 0 of DP rank 0. Stage dicts are gathered over the PP group.
    is_sender = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    pp_size = ps.get_pipeline_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    for name, t in iter_hf_tensors(model_chunks, arch, dtype, of):  # every rank joins the gathers ...
        if is_sender:  # ... but only senders keep the result (a whole stage per rank would not fit an MoE node)
            # Stage dicts cross ranks pickled, and pickling a view writes its whole storage. Megatron's DDP keeps
            # every parameter as a view of one contiguous grad-bucket buffer, so without the copy each of a
            # stage's ~100 tensors would carry the whole stage: SmolLM2 at PP2 grew to 10 GB a rank and was killed.
            local[name] = t.detach().clone() if pp_size > 1 and _is_view(t) else t
    out: dict[str, torch.Tensor] | None = None
    if is_sender:
        pp_group = ps.get_pipeline_model_parallel_group()
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


@dataclass
class SharedParams:
    """What ``share_hf_params`` did: which HF tensors are views of the Megatron storage, which are copies."""

    shared: list[str]
    copied: list[str]
    shared_bytes: int
    copied_bytes: int
    """Bytes of the copies: Megatron's fused QKV interleaves the query groups ([q of group g; k_g; v_g], see
    ``mapping``), so HF's separate q/k/v rows are strided, not contiguous, unless there is one KV group."""
    num_params: int


def _shares_storage(t: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``t`` lies inside ``param``'s storage (a view of it, or of the DDP buffer it is a view of)."""
    return t.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


@torch.no_grad()
def share_hf_params(hf_model: torch.nn.Module, model_chunks: list[torch.nn.Module], arch: ModelArch
                    ) -> SharedParams:
    """Make every parameter of ``hf_model`` (a transformers model of ``arch``) read the Megatron chunks' weights.

    Each Megatron parameter goes through ``mapping.to_hf``; an HF tensor that comes out as a view of the
    parameter (embedding and output rows without the vocab padding, norms, o_proj, down_proj, gate/up as the two
    row halves of linear_fc1) becomes that parameter's storage, so the optimizer's in-place updates reach the HF
    model with no copy. The rest (q/k/v of the fused QKV with more than one KV group) are fresh tensors, the HF
    model's own until the next call. Call again after every optimizer step: it re-materialises the copies and
    re-points the views, should Megatron have moved a parameter's storage. Model parallelism must be 1 (the
    chunks hold every weight unsharded); CheckpointError names an HF parameter left unbound or a shape that
    does not fit.
    """
    _, tp_size, _ = _tp_info()
    _, etp_size, _, _, ep_size, _ = _expert_info()
    if max(tp_size, etp_size, ep_size) > 1:
        raise CheckpointError(f"sharing weights needs unsharded parameters, got TP {tp_size}, expert TP "
                              f"{etp_size}, EP {ep_size}")
    hf_params = dict(hf_model.named_parameters())  # tied weights appear once, under the first name
    out = SharedParams([], [], 0, 0, 0)
    bound: set[str] = set()
    for chunk in model_chunks:
        for _, canonical, param in named_canonical_params(chunk):
            if canonical == "output_layer.weight" and arch.tie_word_embeddings:
                continue
            for name, t in mapping.to_hf(canonical, param.detach(), arch).items():
                target = hf_params.get(name)
                if target is None:
                    raise CheckpointError(f"the HF model has no parameter {name!r} (from {canonical})")
                if tuple(t.shape) != tuple(target.shape):
                    raise CheckpointError(f"{name}: Megatron gives {tuple(t.shape)}, the HF model has "
                                          f"{tuple(target.shape)}")
                t = t.to(target.dtype)  # a no-op (a view) when the dtypes agree
                nbytes = t.numel() * t.element_size()
                out.num_params += t.numel()
                if _shares_storage(t, param):
                    out.shared.append(name)
                    out.shared_bytes += nbytes
                else:
                    out.copied.append(name)
                    out.copied_bytes += nbytes
                target.data = t  # a view, or a tensor this call just made (the old copy is freed)
                bound.add(name)
    missing = sorted(set(hf_params) - bound)
    if missing:
        raise CheckpointError(f"HF parameters with no Megatron source: {missing[:5]}")
    return out
