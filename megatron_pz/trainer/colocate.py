"""Colocated rollout (``rollout.colocate=true``, world size 1): the embedded engine in the trainer process, on the
trainer's own parameters.

What runs is what a disaggregated run launches as ``serve-rollout``: the same ``EmbeddedEngine`` behind the same
``RolloutServer`` (SGLang's HTTP wire format, the same batcher), here on a thread of the trainer process, and the
same ``RolloutPool`` client in front of it; the loop cannot tell. What changes is where the engine's weights
come from: its HF model is built without weights (``engine.model.build_model``) and its parameters are pointed at
the Megatron parameters (``convert.bridge.share_hf_params``): views of the DDP parameter buffer for every tensor
whose layout coincides, fresh tensors for q/k/v (Megatron's fused QKV interleaves the query groups). A weight sync
is ``SharedWeightSync``: re-point, re-materialise q/k/v, bump the version; nothing is gathered or written.

Rollout and training take turns in the loop (``train.py``), so the engine never generates while the optimizer
writes the shared storage.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.dtypes import long_name
from megatron_pz.errors import ConfigError

if TYPE_CHECKING:
    from megatron_pz.trainer.run import Run

logger = logging.getLogger(__name__)


def start_colocated(run: Run) -> None:
    """Build the engine on the trainer's weights, serve it in-process, connect the pool, set the shared sync."""
    from megatron_pz.convert.bridge import share_hf_params
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.model import build_model
    from megatron_pz.engine.server import RolloutServer, ServerConfig
    from megatron_pz.rollout.pool import PoolConfig, RolloutPool
    from megatron_pz.rollout.sglang_client import ClientConfig
    from megatron_pz.weight_sync import SharedWeightSync

    r = run.cfg.rollout
    world = torch.distributed.get_world_size()
    if world != 1:  # RunConfig.validate_world refused it already; this guards a caller that skipped it
        raise ConfigError(f"rollout.colocate=true needs world size 1, got {world}")
    meta = run.out / ckpt.RUN_HF_META_DIR
    lm = build_model(meta, long_name(r.embedded_dtype))
    engine = EmbeddedEngine(meta, weight_version=run.weight_version, max_batch_size=r.embedded_max_batch_size,
                            loaded=lm)
    refresh = partial(share_hf_params, lm.model, run.chunks, run.arch)
    bound = refresh()
    logger.info("colocated engine: %d tensors (%.1f MB) are views of the trainer's parameters, %d (%.1f MB: %s) "
                "copies re-materialised at each weight sync", len(bound.shared), bound.shared_bytes / 1e6,
                len(bound.copied), bound.copied_bytes / 1e6, _kinds(bound.copied))
    run.colocated_server = RolloutServer(engine, ServerConfig(port=0, api_key=r.api_key)).start(r.timeout_s)
    run.engine = RolloutPool([run.colocated_server.url],
                             PoolConfig(max_concurrency_per_server=r.max_concurrency_per_server),
                             ClientConfig(api_key=r.api_key, generate_timeout_s=r.timeout_s,
                                          max_retries=r.max_retries,
                                          return_routed_experts=run.cfg.model.moe_routing_replay))
    run.weights.engine = run.engine
    run.weights.sync = SharedWeightSync(engine, refresh, pool=run.engine, current_version=run.weight_version)


def _kinds(names: list[str]) -> str:
    """'q_proj, k_proj, v_proj' for the copied tensors' module names (layer indices dropped)."""
    kinds = dict.fromkeys(n.split(".")[-2] for n in names)
    return ", ".join(kinds) or "none"
