"""Colocated rollout (``rollout.colocate=true``): the embedded engine in the trainer process, no second process.

What runs is what a disaggregated run launches as ``serve-rollout``: the same ``EmbeddedEngine`` behind the same
``RolloutServer`` (SGLang's HTTP wire format, the same batcher), here on a thread of global rank 0's trainer
process, and the same ``RolloutPool`` client in front of it on every data owner; the loop cannot tell. What
changes is where the engine's weights come from. Its HF model is built from the run's HF meta without weights
(``engine.model.build_model``), then:

* world size 1 (``SharedWeightSync``): its parameters are pointed at the Megatron parameters
  (``convert.bridge.share_hf_params``): views of the DDP parameter buffer for every tensor whose layout coincides,
  fresh tensors for q/k/v (Megatron's fused QKV interleaves the query groups). A weight sync re-points,
  re-materialises q/k/v and bumps the version; nothing is gathered or written.
* world size > 1 (TP, PP, DP; ``InMemoryWeightSync``): no rank holds the whole model in one piece, so rank 0's
  engine keeps its own full copy. A weight sync gathers the HF tensors on rank 0 with the collective export every
  sync uses, and copies them into the engine's parameters in place under its generation lock; no disk write, no
  HTTP update. The other data owners (DP ranks) reach rank 0's server over HTTP, as they would a launched one.

Where the world spans several nodes, data owners on other nodes must reach rank 0's server: it then binds every
interface and is named by rank 0's host name, with ``rollout.api_key`` / ``$MEGATRON_PZ_ROLLOUT_API_KEY`` or, when
neither is set, a key generated for the run and handed to the data owners with the URL (a server off loopback
always requires a key). A single-node run stays on loopback, with the configured key if there is one.

Rollout and training take turns in the loop (``train.py``), so the engine never generates while the optimizer
writes the shared storage (world size 1) or while a sync copies into its own (world size > 1).
"""
from __future__ import annotations

import logging
import secrets
import socket
from functools import partial
from pathlib import Path

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.config import RunConfig
from megatron_pz.convert.bridge import share_hf_params
from megatron_pz.dtypes import long_name
from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.engine.model import LoadedModel, build_model
from megatron_pz.engine.server import RolloutServer, ServerConfig
from megatron_pz.engine.weights import StateSpec, validate_state
from megatron_pz.parallel import hostnames, is_rank0
from megatron_pz.trainer.connect import Engine, open_pool, rollout_api_key, weights_dir
from megatron_pz.weight_sync import InMemoryWeightSync, SharedWeightSync
from megatron_pz.weight_sync.publisher import WeightPublisher

logger = logging.getLogger(__name__)


def connect_colocated(cfg: RunConfig, out: Path, weights: WeightPublisher, chunks: list[torch.nn.Module],
                      is_data_owner: bool) -> Engine:
    """Build the engine on rank 0, serve it in-process, connect every data owner's pool, give rank 0's publisher
    its sync. Collective at world size > 1 (the initial export and the URL broadcast)."""
    engine = Engine(cfg.rollout, weights_dir(cfg.rollout, out))
    if torch.distributed.get_world_size() == 1:
        _start_shared(cfg, out, weights, chunks, engine)
    else:
        _start_gathered(cfg, out, weights, chunks, engine, is_data_owner)
    return engine


def _start_shared(cfg: RunConfig, out: Path, weights: WeightPublisher, chunks: list[torch.nn.Module],
                  engine: Engine) -> None:
    """World size 1: the engine's parameters are the trainer's own storage."""
    lm = _build(cfg, out)
    served = _engine(cfg, out, lm, weights.version)
    refresh = partial(share_hf_params, lm.model, chunks, weights.arch)
    bound = refresh()
    logger.info("colocated engine: %d tensors (%.1f MB) are views of the trainer's parameters, %d (%.1f MB: %s) "
                "copies re-materialised at each weight sync", len(bound.shared), bound.shared_bytes / 1e6,
                len(bound.copied), bound.copied_bytes / 1e6, _kinds(bound.copied))
    engine.colocated, key = _serve(cfg, served, spans_nodes=False)
    engine.pool = open_pool(cfg.rollout, [engine.colocated.url], routed_experts=cfg.model.moe_routing_replay,
                            api_key=key)
    weights.attach(SharedWeightSync(served, refresh, pool=engine.pool, current_version=weights.version), engine.pool)


def _start_gathered(cfg: RunConfig, out: Path, weights: WeightPublisher, chunks: list[torch.nn.Module],
                    engine: Engine, is_data_owner: bool) -> None:
    """World size > 1: rank 0's engine holds a full copy, loaded from the gathered export (collective)."""
    spans_nodes = _spans_nodes()  # collective
    state = weights.export(chunks)  # collective; the HF tensors on global rank 0, None elsewhere
    served, where = None, [None]
    if is_rank0():
        lm = _build(cfg, out)
        load_state(lm, state, f"the gathered weights of version {weights.version}")
        served = _engine(cfg, out, lm, weights.version)
        logger.info("colocated engine on global rank 0: its own copy of the %d gathered tensors (%.1f MB), copied "
                    "in place at each weight sync", len(state), sum(t.numel() * t.element_size()
                                                                     for t in state.values()) / 1e6)
        engine.colocated, key = _serve(cfg, served, spans_nodes)
        where = [(engine.colocated.url if not spans_nodes else
                  f"http://{socket.gethostname()}:{engine.colocated.port}", key)]
    del state
    torch.distributed.broadcast_object_list(where, src=0)  # every data owner reaches rank 0's server
    if is_data_owner:
        url, key = where[0]
        engine.pool = open_pool(cfg.rollout, [url], routed_experts=cfg.model.moe_routing_replay, api_key=key)
    sync = InMemoryWeightSync(served, pool=engine.pool, current_version=weights.version) if served else None
    weights.attach(sync, engine.pool)


def _spans_nodes() -> bool:
    """Whether the ranks of the default group run on more than one host (collective)."""
    return len(set(hostnames())) > 1


def load_state(lm: LoadedModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a complete HF state into a freshly built model (validated first: names, shapes, finite values).
    Before the engine serves, so no lock is needed."""
    params = lm.model.state_dict()
    with torch.no_grad():
        for name, t in validate_state(state, StateSpec.of(lm.model), source).items():
            params[name].copy_(t)


def _build(cfg: RunConfig, out: Path) -> LoadedModel:
    return build_model(out / ckpt.RUN_HF_META_DIR, long_name(cfg.rollout.embedded_dtype))


def _engine(cfg: RunConfig, out: Path, lm: LoadedModel, version: int) -> EmbeddedEngine:
    return EmbeddedEngine(out / ckpt.RUN_HF_META_DIR, weight_version=version,
                          max_batch_size=cfg.rollout.embedded_max_batch_size, loaded=lm)


def _serve(cfg: RunConfig, served: EmbeddedEngine, spans_nodes: bool) -> tuple[RolloutServer, str | None]:
    """Start the engine's server on a thread of this process; returns it and the key clients must send. Loopback
    on one node; every interface, with the configured key or one generated for the run, when ranks span nodes."""
    r = cfg.rollout
    key = rollout_api_key(r)
    if spans_nodes:
        key = key or secrets.token_urlsafe(32)
        config = ServerConfig(host="0.0.0.0", port=0, api_key=key)
    else:
        config = ServerConfig(port=0, api_key=key)
    return RolloutServer(served, config).start(r.timeout_s), key


def _kinds(names: list[str]) -> str:
    """'q_proj, k_proj, v_proj' for the copied tensors' module names (layer indices dropped)."""
    kinds = dict.fromkeys(n.split(".")[-2] for n in names)
    return ", ".join(kinds) or "none"
