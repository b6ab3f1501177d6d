"""MoE routing replay (R3): the policy forward routes every token to the experts the rollout engine chose.

A bf16 rollout engine and an fp32 (or differently fused) trainer compute slightly different router logits; where
two experts are close, they pick different ones, and the trainer's log-prob of that token comes from another
sub-network than the one that sampled it. Replaying the engine's choice removes that source of mismatch; the
router still computes the gate weights from its own logits at the replayed experts, so gradients reach it.

Megatron-Core 0.16 ships the mechanism (``TransformerConfig.moe_enable_routing_replay``: every router owns a
``RouterReplay``; in ``REPLAY_FORWARD`` its top-k is the given ids and the probabilities are gathered at them).
This module feeds it, per micro-batch and per local MoE layer, ids laid out as that router sees its tokens:

    micro-batch routed_experts [B, S, L*K]  ->  layer l: [S_local * B, K], sequence-major (the router's input is
    [S_local, B, H] flattened), S_local = S / TP with sequence parallelism (rank r: rows r*S/TP ..), else S.

Pipeline stages replay only their own layers (``layer_number`` is global). With activation recomputation the
backward's recomputed forward replays the same ids (``after_forward``). Rows the engine did not record (the
last response token and padding, -1) get experts 0..K-1: they come after every loss position, and causal
attention keeps them from changing any earlier token.
"""
from __future__ import annotations

import torch


def replayed_routers(chunk: torch.nn.Module) -> list[tuple[int, object]]:
    """(global 0-based layer index, router) of each MoE layer of one model chunk whose router can replay
    (``router.router_replay``; ``router.topk``); [] for a dense model or one built without replay."""
    from megatron_pz.model.provider import unwrap

    decoder = getattr(unwrap(chunk), "decoder", None)
    out = []
    for layer in getattr(decoder, "layers", []):
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if getattr(router, "router_replay", None) is not None:
            out.append((layer.layer_number - 1, router))
    return out


def layer_indices(routed: torch.Tensor, layer: int, topk: int, sp_rank: int = 0, sp_size: int = 1) -> torch.Tensor:
    """[B, S, L*K] ids -> layer ``layer``'s [S_local * B, K] int64 (sequence-major, this SP rank's rows)."""
    b, s, _ = routed.shape
    ids = routed[:, :, layer * topk:(layer + 1) * topk].transpose(0, 1)  # [S, B, K]
    if sp_size > 1:
        chunk = s // sp_size
        ids = ids[sp_rank * chunk:(sp_rank + 1) * chunk]
    ids = ids.reshape(-1, topk).long()
    missing = ids[:, 0] < 0
    if missing.any():
        ids = ids.clone()
        ids[missing] = torch.arange(topk, device=ids.device)
    return ids


def start_replay(model: list[torch.nn.Module]) -> None:
    """Before a step's forward/backward: forget whatever an earlier step left armed (targets, the backward list;
    a RECORD action set by the caller stays)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for chunk in model:
        for _, router in replayed_routers(chunk):
            router.router_replay.clear_indices()
            if router.router_replay.router_replay_action != RouterReplayAction.RECORD:
                router.router_replay.clear_router_replay_action()


def set_replay(chunk: torch.nn.Module, routed: torch.Tensor | None) -> None:
    """Arm the chunk's routers with ``routed`` ([B, S, L*K], see ``layer_indices``) for its next forward, or, for
    None, let them route by their own logits. Call right before each micro-batch's forward (cheap for a dense
    model: no router, nothing to do); ``after_forward`` right after it."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_pz.model.provider import unwrap

    routers = replayed_routers(chunk)
    if routed is None:  # route by the router's own logits (a RECORD action set by the caller stays)
        for _, router in routers:
            if router.router_replay.router_replay_action in (RouterReplayAction.REPLAY_FORWARD,
                                                             RouterReplayAction.REPLAY_BACKWARD):
                router.router_replay.clear_router_replay_action()
        return
    if not routers:
        raise ValueError("routing replay data given, but the model was built without "
                         "moe_enable_routing_replay (model.moe_routing_replay: true)")
    sp = bool(unwrap(chunk).config.sequence_parallel)
    sp_size = ps.get_tensor_model_parallel_world_size() if sp else 1
    sp_rank = ps.get_tensor_model_parallel_rank() if sp else 0
    for layer, router in routers:
        # set_target_indices also queues the ids for a recomputed forward in backward (REPLAY_BACKWARD pops them
        # in micro-batch order, which is the order Megatron's schedules run backward passes in)
        router.router_replay.set_target_indices(layer_indices(routed, layer, router.topk, sp_rank, sp_size))
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def after_forward(chunk: torch.nn.Module, backward: bool) -> None:
    """Right after a micro-batch's forward. Activation recomputation (``model.recompute_granularity``) runs the
    layers' forward again during ``backward``: those recomputed routers must replay this micro-batch's ids, queued
    by ``set_replay``, so the routers switch to REPLAY_BACKWARD. Otherwise nothing reads the ids again: drop them.
    """
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_pz.model.provider import unwrap

    routers = replayed_routers(chunk)
    if not routers or routers[0][1].router_replay.router_replay_action != RouterReplayAction.REPLAY_FORWARD:
        return
    recompute = backward and unwrap(chunk).config.recompute_granularity is not None
    for _, router in routers:
        if recompute:
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
        else:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()


def flip_rate(a: torch.Tensor, b: torch.Tensor, topk: int) -> float:
    """Share of (token, layer) routings whose expert *sets* differ between two ``[..., L*K]`` id arrays."""
    a = a.reshape(-1, topk).sort(dim=-1).values
    b = b.reshape(-1, topk).sort(dim=-1).values
    return float((a != b).any(dim=-1).float().mean()) if a.numel() else 0.0
