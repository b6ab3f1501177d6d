"""Connect a run to its rollout engine, and keep it up.

``connect`` starts the embedded server (or finds the SGLang ones), opens a pool on every data owner and builds
global rank 0's weight-sync strategy; a colocated run (``rollout.colocate``) is ``trainer/colocate.py``. Both open
their pools with ``open_pool``, the one mapping from ``RolloutConfig`` to the pool and client settings (API key
from the config or ``$MEGATRON_PZ_ROLLOUT_API_KEY``). What they connect is an ``Engine``: the pool, the servers
this process started and the restart budget, owned in one place; ``Engine.recover`` restarts a launched server
that died. The per-step push is ``weight_sync/publisher.py``.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.config import RolloutConfig, RunConfig
from megatron_pz.dtypes import long_name
from megatron_pz.engine.server import RolloutServer
from megatron_pz.errors import ConfigError, RolloutError
from megatron_pz.parallel import free_port, is_rank0
from megatron_pz.rollout import launcher
from megatron_pz.rollout.launcher import API_KEY_ENV, LaunchedServer, ServerSpec
from megatron_pz.rollout.pool import PoolConfig, RolloutPool, read_endpoints_file
from megatron_pz.rollout.sglang_client import ClientConfig
from megatron_pz.trainer.deadline import any_rank
from megatron_pz.weight_sync import DiskWeightSync, DistributedWeightSync, TensorWeightSync, WeightSync
from megatron_pz.weight_sync.disk import version_dir_name
from megatron_pz.weight_sync.publisher import WeightPublisher

logger = logging.getLogger(__name__)

# SGLang's memory types (GPU_MEMORY_TYPE_* in sglang/srt/constants.py): the weights come back before a weight
# update writes them, the KV cache and CUDA graphs after it.
WEIGHTS_MEMORY = ("weights",)
SERVING_MEMORY = ("kv_cache", "cuda_graph")


def rollout_api_key(r: RolloutConfig) -> str | None:
    """rollout.api_key, else $MEGATRON_PZ_ROLLOUT_API_KEY: the variable the launcher and `serve-rollout` read, so a
    Slurm job can hand one key to servers and trainer without writing it into any command line (`ps`, sacct)."""
    return r.api_key or os.environ.get(API_KEY_ENV) or None


def weights_dir(r: RolloutConfig, out: Path) -> Path:
    """Where the run's weight versions are written (``rollout.weights_dir``, else ``<output_dir>/weights``)."""
    return Path(r.weights_dir or out / "weights").resolve()


def open_pool(r: RolloutConfig, urls: list[str], *, routed_experts: bool, api_key: str | None = None) -> RolloutPool:
    """A data owner's pool on ``urls``, every setting from ``rollout.*`` (``api_key``: a key generated for the run
    overrides the configured one). SGLang gives every sample of a request its one sampling_seed, so seeded groups go
    out one sample a request there."""
    return RolloutPool(urls, PoolConfig(max_concurrency_per_server=r.max_concurrency_per_server,
                                        split_seeded=r.backend == "sglang" and not r.colocate),
                       ClientConfig(api_key=api_key or rollout_api_key(r), generate_timeout_s=r.timeout_s,
                                    max_retries=r.max_retries, return_routed_experts=routed_experts),
                       router_url=None if r.colocate else r.router_url)


@dataclass
class Engine:
    """The rollout engine as this process sees it: its data owner's pool (None on other ranks), the servers it
    launched (global rank 0, embedded backend), the colocated server (global rank 0, ``rollout.colocate``), the
    folder the weight versions are written to, and the restarts spent (``rollout.max_engine_restarts``)."""

    cfg: RolloutConfig
    weights_dir: Path
    pool: RolloutPool | None = None
    servers: list[LaunchedServer] = field(default_factory=list)
    colocated: RolloutServer | None = None
    restarts: int = 0

    def recover(self, error: RolloutError | None, where: str, version: int) -> bool:
        """After a stage's calls to the engine (``error``: this rank's failure, None if it had none): True when a
        server was restarted and the caller should retry the stage, False when nothing failed. Collective.

        With ``rollout.backend=embedded`` and ``rollout.max_engine_restarts > 0`` the ranks first agree whether any
        of them failed. Then rank 0 restarts every server it launched that has died, on the same port, from the
        folder of weight ``version`` (the disk sync wrote it before any server loaded it; restarting from it is the
        push of the current weights), and logs one line per event. Every data owner's pool takes the servers back
        at that version (``RolloutPool.revive``). A failure with no dead launched server behind it (a bad answer, a
        server that is up), or with the restart budget spent, or a restart that itself fails, is raised on every
        rank: the rank's own error where it had one (the CLI turns it into exit status 3), a RolloutError that names
        the stage elsewhere. External servers (``backend=sglang``) are never restarted: the error is raised as is.
        """
        r = self.cfg
        if r.backend != "embedded" or r.max_engine_restarts == 0:  # the same on every rank: no collective needed
            if error is not None:
                raise error
            return False
        if not any_rank(error is not None):
            return False
        verdict: list[str | None] = [None]  # None: restarted; else why not
        if is_rank0():
            verdict[0] = self._restart_dead_servers(where, error, version)
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            if error is not None:
                raise error
            raise RolloutError(f"{where}: the rollout failed on another rank ({verdict[0]})")
        if self.pool is not None:
            self.pool.revive(version)
        return True

    def _restart_dead_servers(self, where: str, error: RolloutError | None, version: int) -> str | None:
        """Rank 0: restart the launched servers that died; None when done, else why they were not restarted."""
        r = self.cfg
        dead = [i for i, s in enumerate(self.servers) if not s.alive()]
        if not dead:
            return f"no rollout server this trainer launched has died: {error or 'a failure on another rank'}"
        if self.restarts + len(dead) > r.max_engine_restarts:
            return (f"rollout server(s) {', '.join(self.servers[i].url for i in dead)} died again after "
                    f"{self.restarts} restart(s), rollout.max_engine_restarts={r.max_engine_restarts}")
        model = self.weights_dir / version_dir_name(version)
        for i in dead:
            old = self.servers[i]
            code = old.proc.poll()
            self.restarts += 1
            logger.warning("%s: rollout server %s died (exit code %s); restarting it with weight version %d "
                           "(restart %d of rollout.max_engine_restarts=%d), then retrying", where, old.url, code,
                           version, self.restarts, r.max_engine_restarts)
            try:
                self.servers[i] = launcher.relaunch(old, str(model), version, health_timeout_s=r.timeout_s)
            except RolloutError as exc:
                return f"restarting {old.url} failed: {exc}"
        return None

    def release_memory(self) -> None:
        """``rollout.release_memory_in_train``: the SGLang servers on the trainer's GPUs free their weights, KV cache
        and CUDA graphs (every type) for the train phase. Global rank 0 asks every server, once the rollout is over
        (SGLang releases only when idle). Nothing otherwise."""
        if self.cfg.release_memory_in_train and is_rank0():
            self.pool.release_memory_occupation(None)

    def resume_memory(self, tags: tuple[str, ...]) -> None:
        """The memory ``release_memory`` freed, ``tags`` of it (``WEIGHTS_MEMORY`` before the weight sync,
        ``SERVING_MEMORY`` after it). Global rank 0; nothing without ``rollout.release_memory_in_train``."""
        if self.cfg.release_memory_in_train and is_rank0():
            self.pool.resume_memory_occupation(list(tags))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.colocated is not None:
            self.colocated.stop()
            self.colocated = None
        launcher.stop_all(self.servers)


def connect(cfg: RunConfig, out: Path, weights: WeightPublisher, chunks: list[torch.nn.Module],
            is_data_owner: bool) -> Engine:
    """Data owners get a rollout pool; for the embedded backend, rank 0 starts the server first; rank 0's publisher
    gets the sync strategy. Collective."""
    r = cfg.rollout
    engine = Engine(r, weights_dir(r, out))
    state = weights.export(chunks)  # collective
    urls: list[str] = []
    if is_rank0():
        writer = DiskWeightSync(None, engine.weights_dir, hf_config_dir=out / ckpt.RUN_HF_META_DIR)
        stale = writer.drop_versions_after(weights.version)
        if stale:
            logger.warning("removed weight versions %s from %s: written after the last checkpoint by a run that "
                           "did not finish (this run writes them again)", stale, engine.weights_dir)
        if r.backend == "embedded":
            first = fresh_version_dir(writer, state, weights.version)
            spec = ServerSpec(kind="embedded", model_path=str(first), port=free_port(),
                              weights_dir=str(engine.weights_dir), die_with_parent=True,
                              weight_version=weights.version, log_path=str(out / "rollout_server.log"),
                              api_key=rollout_api_key(r),
                              extra_args=["--max-batch-size", str(r.embedded_max_batch_size),
                                          "--dtype", long_name(r.embedded_dtype)])
            engine.servers = launcher.launch([spec], endpoints_file=out / "endpoints.txt", health_timeout_s=r.timeout_s)
            urls = [s.url for s in engine.servers]
        else:
            urls = list(r.urls) or read_endpoints_file(r.endpoints_file or "")
    box = [urls]
    torch.distributed.broadcast_object_list(box, src=0)
    if is_data_owner:
        engine.pool = open_pool(r, box[0], routed_experts=cfg.model.moe_routing_replay)
    sync = None
    if is_rank0():
        sync = make_weight_sync(r, out, engine, weights.version)
    weights.attach(sync, engine.pool)
    if r.backend == "sglang":
        # SGLang servers were started from the initial checkpoint by the launcher; bring them to ours.
        weights.publish(state)
    return engine


def make_weight_sync(r: RolloutConfig, out: Path, engine: Engine, current: int) -> WeightSync:
    """The configured Megatron -> rollout weight path (global rank 0, which holds the gathered HF tensors)."""
    bucket = r.bucket_mb * 1024**2
    if r.weight_sync == "disk":
        return DiskWeightSync(engine.pool, engine.weights_dir, hf_config_dir=out / ckpt.RUN_HF_META_DIR,
                              shard_bytes=bucket, current_version=current)
    clients = engine.pool.clients
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
    path = writer.weights_dir / version_dir_name(version)
    shutil.rmtree(path, ignore_errors=True)
    return writer.write(state.items(), version)[0]
