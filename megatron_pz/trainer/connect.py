"""Connect a run to its rollout engine: start the embedded server (or find the SGLang ones), open a pool on
every data owner, and give global rank 0 the configured weight-sync strategy; and restart a server this trainer
launched when it dies (``recover_rollout``). A colocated run (``rollout.colocate``) is ``trainer/colocate.py``.

The per-step push is ``weight_sync/publisher.py``.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.dtypes import long_name
from megatron_pz.errors import ConfigError, RolloutError
from megatron_pz.parallel import free_port

if TYPE_CHECKING:
    from megatron_pz.config import RolloutConfig
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
    if r.colocate:  # the engine in this process, on these parameters: nothing to launch, write or push
        from megatron_pz.trainer.colocate import start_colocated

        start_colocated(run)
        return
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
                              api_key=rollout_api_key(r),
                              extra_args=["--max-batch-size", str(r.embedded_max_batch_size),
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
                                 ClientConfig(api_key=rollout_api_key(r), generate_timeout_s=r.timeout_s,
                                              max_retries=r.max_retries,
                                              return_routed_experts=run.cfg.model.moe_routing_replay),
                                 router_url=r.router_url)
        run.weights.engine = run.engine
    if torch.distributed.get_rank() == 0:
        run.weights.sync = make_weight_sync(run, weights_dir)
    if r.backend == "sglang":
        # SGLang servers were started from the initial checkpoint by the launcher; bring them to ours.
        run.weights.publish(state)


def rollout_api_key(r: RolloutConfig) -> str | None:
    """rollout.api_key, else $MEGATRON_PZ_ROLLOUT_API_KEY: the variable the launcher and `serve-rollout` read, so a
    Slurm job can hand one key to servers and trainer without writing it into any command line (`ps`, sacct)."""
    from megatron_pz.rollout.launcher import API_KEY_ENV

    return r.api_key or os.environ.get(API_KEY_ENV) or None


# SGLang's memory types (GPU_MEMORY_TYPE_* in sglang/srt/constants.py): the weights come back before a weight
# update writes them, the KV cache and CUDA graphs after it.
WEIGHTS_MEMORY = ("weights",)
SERVING_MEMORY = ("kv_cache", "cuda_graph")


def release_rollout_memory(run: Run) -> None:
    """``rollout.release_memory_in_train``: the SGLang servers on the trainer's GPUs free their weights, KV cache and
    CUDA graphs (every type) for the train phase. Global rank 0 asks every server, once the rollout is over (SGLang
    releases only when idle). Nothing otherwise."""
    if run.cfg.rollout.release_memory_in_train and torch.distributed.get_rank() == 0:
        run.engine.release_memory_occupation(None)


def resume_rollout_memory(run: Run, tags: tuple[str, ...]) -> None:
    """The memory ``release_rollout_memory`` freed, ``tags`` of it (``WEIGHTS_MEMORY`` before the weight sync,
    ``SERVING_MEMORY`` after it). Global rank 0; nothing without ``rollout.release_memory_in_train``."""
    if run.cfg.rollout.release_memory_in_train and torch.distributed.get_rank() == 0:
        run.engine.resume_memory_occupation(list(tags))


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


def recover_rollout(run: Run, error: RolloutError | None, where: str) -> bool:
    """After a stage's calls to the rollout engine (``error``: this rank's failure, None if it had none): True when
    a server was restarted and the caller should retry the stage, False when nothing failed. Collective.

    With ``rollout.backend=embedded`` and ``rollout.max_engine_restarts > 0`` the ranks first agree whether any of
    them failed. Then rank 0 restarts every server it launched that has died, on the same port, from the folder of
    the weight version the run is at (the disk sync wrote it before any server loaded it; restarting from it is the
    push of the current weights), and logs one line per event. Every data owner's pool takes the servers back at
    that version (``RolloutPool.revive``). A failure with no dead launched server behind it (a bad answer, a server
    that is up), or with the restart budget spent, or a restart that itself fails, is raised on every rank: the
    rank's own error where it had one (``train.main_from_args`` turns it into exit status 3), a RolloutError that
    names the stage elsewhere. External servers (``backend=sglang``) are never restarted: the error is raised as is.
    """
    from megatron_pz.trainer.deadline import any_rank

    r = run.cfg.rollout
    if r.backend != "embedded" or r.max_engine_restarts == 0:  # the same on every rank: no collective needed
        if error is not None:
            raise error
        return False
    if not any_rank(error is not None):
        return False
    verdict: list[str | None] = [None]  # None: restarted; else why not
    if torch.distributed.get_rank() == 0:
        verdict[0] = _restart_dead_servers(run, where, error)
    torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        if error is not None:
            raise error
        raise RolloutError(f"{where}: the rollout failed on another rank ({verdict[0]})")
    if run.engine is not None:
        run.engine.revive(run.weight_version)
    return True


def _restart_dead_servers(run: Run, where: str, error: RolloutError | None) -> str | None:
    """Rank 0: restart the launched servers that died; None when done, else why they were not restarted."""
    from megatron_pz.rollout.launcher import relaunch
    from megatron_pz.weight_sync.disk import version_dir_name

    r = run.cfg.rollout
    dead = [i for i, s in enumerate(run.servers) if not s.alive()]
    if not dead:
        return f"no rollout server this trainer launched has died: {error or 'a failure on another rank'}"
    if run.engine_restarts + len(dead) > r.max_engine_restarts:
        return (f"rollout server(s) {', '.join(run.servers[i].url for i in dead)} died again after "
                f"{run.engine_restarts} restart(s), rollout.max_engine_restarts={r.max_engine_restarts}")
    version = run.weight_version
    model = Path(r.weights_dir or run.out / "weights").resolve() / version_dir_name(version)
    for i in dead:
        old = run.servers[i]
        code = old.proc.poll()
        run.engine_restarts += 1
        logger.warning("%s: rollout server %s died (exit code %s); restarting it with weight version %d "
                       "(restart %d of rollout.max_engine_restarts=%d), then retrying", where, old.url, code, version,
                       run.engine_restarts, r.max_engine_restarts)
        try:
            run.servers[i] = relaunch(old, str(model), version, health_timeout_s=r.timeout_s)
        except RolloutError as exc:
            return f"restarting {old.url} failed: {exc}"
    return None


def stop_rollout(run: Run) -> None:
    from megatron_pz.rollout.launcher import stop_all

    run.weights.close()
    if run.engine is not None:
        run.engine.close()
    if run.colocated_server is not None:
        run.colocated_server.stop()
        run.colocated_server = None
    stop_all(run.servers)
