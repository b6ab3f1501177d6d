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

Rollout and training take turns in the loop (``train.py``), so the engine never generates while the optimizer
writes the shared storage (world size 1) or while a sync copies into its own (world size > 1).
"""
from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.dtypes import long_name

if TYPE_CHECKING:
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.model import LoadedModel
    from megatron_pz.trainer.run import Run

logger = logging.getLogger(__name__)


def start_colocated(run: Run) -> None:
    """Build the engine on rank 0, serve it in-process, connect every data owner's pool, set rank 0's sync.
    Collective at world size > 1 (the initial export and the URL broadcast)."""
    if torch.distributed.get_world_size() == 1:
        _start_shared(run)
    else:
        _start_gathered(run)


def _start_shared(run: Run) -> None:
    """World size 1: the engine's parameters are the trainer's own storage."""
    from megatron_pz.convert.bridge import share_hf_params
    from megatron_pz.weight_sync import SharedWeightSync

    lm = _build(run)
    engine = _engine(run, lm)
    refresh = partial(share_hf_params, lm.model, run.chunks, run.arch)
    bound = refresh()
    logger.info("colocated engine: %d tensors (%.1f MB) are views of the trainer's parameters, %d (%.1f MB: %s) "
                "copies re-materialised at each weight sync", len(bound.shared), bound.shared_bytes / 1e6,
                len(bound.copied), bound.copied_bytes / 1e6, _kinds(bound.copied))
    _connect(run, _serve(run, engine))
    run.weights.sync = SharedWeightSync(engine, refresh, pool=run.engine, current_version=run.weight_version)


def _start_gathered(run: Run) -> None:
    """World size > 1: rank 0's engine holds a full copy, loaded from the gathered export (collective)."""
    from megatron_pz.weight_sync import InMemoryWeightSync

    state = run.weights.export(run.chunks)  # collective; the HF tensors on global rank 0, None elsewhere
    engine, url = None, [None]
    if torch.distributed.get_rank() == 0:
        lm = _build(run)
        load_state(lm, state, f"the gathered weights of version {run.weight_version}")
        engine = _engine(run, lm)
        logger.info("colocated engine on global rank 0: its own copy of the %d gathered tensors (%.1f MB), copied "
                    "in place at each weight sync", len(state), sum(t.numel() * t.element_size()
                                                                     for t in state.values()) / 1e6)
        url = [_serve(run, engine)]
    del state
    torch.distributed.broadcast_object_list(url, src=0)  # every data owner reaches rank 0's server
    if run.is_data_owner:
        _connect(run, url[0])
    if engine is not None:
        run.weights.sync = InMemoryWeightSync(engine, pool=run.engine, current_version=run.weight_version)


def load_state(lm: LoadedModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a complete HF state into a freshly built model (validated first: names, shapes, finite values).
    Before the engine serves, so no lock is needed."""
    from megatron_pz.engine.weights import StateSpec, validate_state

    params = lm.model.state_dict()
    with torch.no_grad():
        for name, t in validate_state(state, StateSpec.of(lm.model), source).items():
            params[name].copy_(t)


def _build(run: Run) -> LoadedModel:
    from megatron_pz.engine.model import build_model

    return build_model(run.out / ckpt.RUN_HF_META_DIR, long_name(run.cfg.rollout.embedded_dtype))


def _engine(run: Run, lm: LoadedModel) -> EmbeddedEngine:
    from megatron_pz.engine.engine import EmbeddedEngine

    return EmbeddedEngine(run.out / ckpt.RUN_HF_META_DIR, weight_version=run.weight_version,
                          max_batch_size=run.cfg.rollout.embedded_max_batch_size, loaded=lm)


def _serve(run: Run, engine: EmbeddedEngine) -> str:
    """Start the engine's server on a thread of this process; returns its URL."""
    from megatron_pz.engine.server import RolloutServer, ServerConfig

    r = run.cfg.rollout
    run.colocated_server = RolloutServer(engine, ServerConfig(port=0, api_key=r.api_key)).start(r.timeout_s)
    return run.colocated_server.url


def _connect(run: Run, url: str) -> None:
    """This data owner's pool on the colocated server."""
    from megatron_pz.rollout.pool import PoolConfig, RolloutPool
    from megatron_pz.rollout.sglang_client import ClientConfig

    r = run.cfg.rollout
    run.engine = RolloutPool([url], PoolConfig(max_concurrency_per_server=r.max_concurrency_per_server),
                             ClientConfig(api_key=r.api_key, generate_timeout_s=r.timeout_s,
                                          max_retries=r.max_retries,
                                          return_routed_experts=run.cfg.model.moe_routing_replay))
    run.weights.engine = run.engine


def _kinds(names: list[str]) -> str:
    """'q_proj, k_proj, v_proj' for the copied tensors' module names (layer indices dropped)."""
    kinds = dict.fromkeys(n.split(".")[-2] for n in names)
    return ", ".join(kinds) or "none"
