"""Connect a run to its rollout engine: start the embedded server (or find the SGLang ones), open a pool on
every data owner, and give global rank 0 the configured weight-sync strategy.

Build-time only; the per-step push is ``weight_sync/publisher.py``.
"""
from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.dtypes import long_name
from megatron_pz.errors import ConfigError
from megatron_pz.parallel import free_port

if TYPE_CHECKING:
    from megatron_pz.trainer.run import Run
    from megatron_pz.weight_sync import DiskWeightSync, WeightSync

logger = logging.getLogger(__name__)


def start_rollout(run: Run) -> None:
    """Data owners get a rollout pool; for the embedded backend, rank 0 starts the server first. Collective."""
    from megatron_pz.rollout.launcher import ServerSpec, launch
    from megatron_pz.rollout.pool import PoolConfig, RolloutPool, read_endpoints_file
    from megatron_pz.rollout.sglang_client import ClientConfig
    from megatron_pz.weight_sync import DiskWeightSync

    r = run.cfg.rollout
    weights_dir = Path(r.weights_dir or run.out / "weights").resolve()
    state = run.weights.export(run.chunks)  # collective
    urls: list[str] = []
    if torch.distributed.get_rank() == 0:
        writer = DiskWeightSync(None, weights_dir, hf_config_dir=run.out / ckpt.RUN_HF_META_DIR)
        stale = writer.drop_versions_after(run.weight_version)
        if stale:
            logger.warning("removed weight versions %s from %s: written after the last checkpoint by a run that "
                           "did not finish (this run writes them again)", stale, weights_dir)
        if r.backend == "embedded":
            first = fresh_version_dir(writer, state, run.weight_version)
            spec = ServerSpec(kind="embedded", model_path=str(first), port=free_port(), weights_dir=str(weights_dir),
                              die_with_parent=True,
                              weight_version=run.weight_version, log_path=str(run.out / "rollout_server.log"),
                              api_key=r.api_key, extra_args=["--max-batch-size", str(r.embedded_max_batch_size),
                                                             "--dtype", long_name(r.embedded_dtype)])
            run.servers = launch([spec], endpoints_file=run.out / "endpoints.txt", health_timeout_s=r.timeout_s)
            urls = [s.url for s in run.servers]
        else:
            urls = list(r.urls) or read_endpoints_file(r.endpoints_file or "")
    box = [urls]
    torch.distributed.broadcast_object_list(box, src=0)
    if run.is_data_owner:
        # SGLang gives every sample of a request its one sampling_seed: seeded groups go out one sample a request.
        pool_cfg = PoolConfig(max_concurrency_per_server=r.max_concurrency_per_server,
                              split_seeded=r.backend == "sglang")
        run.engine = RolloutPool(box[0], pool_cfg,
                                 ClientConfig(api_key=r.api_key, generate_timeout_s=r.timeout_s,
                                              max_retries=r.max_retries), router_url=r.router_url)
        run.weights.engine = run.engine
    if torch.distributed.get_rank() == 0:
        run.weights.sync = make_weight_sync(run, weights_dir)
    if r.backend == "sglang":
        # SGLang servers were started from the initial checkpoint by the launcher; bring them to ours.
        run.weights.publish(state)


def make_weight_sync(run: Run, weights_dir: Path) -> WeightSync:
    """The configured Megatron -> rollout weight path (global rank 0, which holds the gathered HF tensors)."""
    from megatron_pz.weight_sync import DiskWeightSync, DistributedWeightSync, TensorWeightSync

    r = run.cfg.rollout
    bucket = r.bucket_mb * 1024**2
    current = run.weight_version
    if r.weight_sync == "disk":
        return DiskWeightSync(run.engine, weights_dir, hf_config_dir=run.out / ckpt.RUN_HF_META_DIR, shard_bytes=bucket,
                              current_version=current)
    clients = run.engine.clients
    if r.weight_sync == "tensor":
        if len(clients) != 1:
            raise ConfigError(f"rollout.weight_sync=tensor (colocated CUDA IPC) needs exactly one server, got "
                              f"{len(clients)}")
        return TensorWeightSync(clients[0], tp_size=r.server_tp_size, bucket_bytes=bucket, current_version=current)
    sync = DistributedWeightSync(clients, master_address=r.weight_sync_master_address or socket.gethostname(),
                                 master_port=free_port(), tp_sizes=[r.server_tp_size] * len(clients),
                                 backend=r.weight_sync_backend, bucket_bytes=bucket, current_version=current,
                                 timeout_s=r.timeout_s)
    sync.init()
    return sync


def fresh_version_dir(writer: DiskWeightSync, state: dict[str, torch.Tensor], version: int) -> Path:
    """Write the initial weights (replacing a leftover folder of the same version from a killed run)."""
    from megatron_pz.weight_sync.disk import version_dir_name

    path = writer.weights_dir / version_dir_name(version)
    shutil.rmtree(path, ignore_errors=True)
    return writer.write(state.items(), version)[0]


def stop_rollout(run: Run) -> None:
    from megatron_pz.rollout.launcher import stop_all

    run.weights.close()
    if run.engine is not None:
        run.engine.close()
    stop_all(run.servers)
