"""torch.distributed + Megatron ``parallel_state`` initialisation from a ``ParallelConfig``.

NCCL on GPU, gloo on CPU (where the CPU device layer is installed first). Works under ``torchrun``/``srun``
(reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) and as a plain single process.
Only this module, the trainer, weight sync and checkpointing read ranks; model code never does.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from megatron_pz import device
from megatron_pz.errors import ConfigError


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism is whatever remains of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    # Tensor parallelism inside each expert (MoE only); null = tensor_model_parallel_size, Megatron's default.
    # 1 suits fine-grained experts (Qwen3-MoE's are 768 wide: splitting them only adds communication).
    expert_tensor_parallel_size: int | None = None
    # Megatron's sequence parallelism (needs TP > 1); activations sharded along the sequence in TP regions.
    sequence_parallel: bool = False
    # Seed of the model-parallel RNG tracker (dropout streams); the data seed lives in the data config.
    seed: int = 1234
    # "auto" = nccl when CUDA is available, else gloo.
    backend: str = "auto"
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size", "timeout_minutes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {v!r}")
        etp = self.expert_tensor_parallel_size
        if etp is not None and (not isinstance(etp, int) or isinstance(etp, bool) or etp < 1):
            raise ConfigError(f"parallel.expert_tensor_parallel_size must be null or a positive integer, got {etp!r}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend must be auto, nccl or gloo, got {self.backend!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")

    @property
    def expert_tensor_size(self) -> int:
        """The effective expert tensor-parallel size (TP unless set)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world size; raises ConfigError when the world cannot be split this way."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP x PP x CP = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size} = {mp}")
        dp = world_size // mp
        # Megatron lays the expert layers out separately: world / PP = ETP x EP x expert-DP.
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_size
        per_stage = world_size // self.pipeline_model_parallel_size
        if (ep > 1 or etp != self.tensor_model_parallel_size) and per_stage % (ep * etp):
            raise ConfigError(
                f"expert_model_parallel_size={ep} x expert_tensor_parallel_size={etp} must divide the ranks of "
                f"a pipeline stage (world size / PP = TP x CP x DP = {per_stage})")
        return dp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: ParallelConfig) -> None:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    device.install()  # no-op with CUDA
    if not torch.distributed.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        init_method = None  # env:// (torchrun, srun, spawn_local set MASTER_ADDR/MASTER_PORT)
        if world == 1 and "MASTER_PORT" not in os.environ:
            # A world of one of our own: rendezvous on a free loopback port *without* exporting it. A
            # MASTER_PORT written into os.environ would be inherited by every subprocess this process starts
            # later (a converter, a trainer, an sbatch script) and collide with the store still listening here.
            init_method = f"tcp://127.0.0.1:{free_port()}"
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.cuda_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend=backend, init_method=init_method, rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    world = torch.distributed.get_world_size()
    cfg.data_parallel_size(world)  # validates divisibility with a clear message
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
    )
    model_parallel_cuda_manual_seed(cfg.seed)


def hostnames() -> list[str]:
    """Every rank's host name, indexed by global rank (collective: one all_gather_object)."""
    hosts: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return [str(h) for h in hosts]


def describe_hosts() -> str:
    """Where the ranks of the default group run (``format_hosts``). Collective: one all_gather_object."""
    return format_hosts(hostnames())


def format_hosts(hosts: list[str]) -> str:
    """``hosts[r]`` = rank r's host name -> ``3 ranks on 2 hosts: a [0-1], b [2]``. Hosts in order of their lowest
    rank; a contiguous run of ranks as ``[first-last]``, anything else listed (``[0,2]``)."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    spans = []
    for host, rs in ranks.items():
        contiguous = len(rs) > 1 and rs == list(range(rs[0], rs[-1] + 1))
        spans.append(f"{host} [{rs[0]}-{rs[-1]}]" if contiguous else f"{host} [{','.join(map(str, rs))}]")
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    return f"{plural(len(hosts), 'rank')} on {plural(len(ranks), 'host')}: {', '.join(spans)}"


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class DataLayout:
    """A rank's place in the data flow: its DP replica, and whether it is that replica's data owner (TP 0, PP 0,
    CP 0), the one rank that reads the corpus and talks to the rollout engine."""

    dp_rank: int
    dp_size: int
    is_data_owner: bool


def data_owner_rank() -> int:
    """Global rank of this rank's data owner: TP 0, PP 0, CP 0 of its DP replica. Only the data owner talks to
    the rollout engine and reads the corpus; the rest of its model-parallel group gets its samples."""
    from megatron.core import parallel_state as ps

    return torch.distributed.get_global_rank(ps.get_model_parallel_group(), 0)


def share_samples(samples: list | None) -> list:
    """Broadcast the data owner's samples (``list[Sample]``; None on the other ranks) to its model-parallel group."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return samples or []
    box = [samples]
    torch.distributed.broadcast_object_list(box, src=data_owner_rank(), group=group)
    return box[0]


def gather_to_all(obj: object) -> list:
    """Every rank's ``obj``, indexed by global rank, on every rank (collective; pickled objects)."""
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _spawn_entry(local_rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    finally:
        destroy_distributed()


def spawn_local(fn, world_size: int, args: tuple = ()) -> None:
    """Run ``fn(*args)`` in ``world_size`` fresh processes forming one gloo/NCCL world on this host.

    For CPU runs and tools (e.g. converting at TP=2 outside torchrun). ``fn`` must be importable
    (module level). Raises if any process fails.
    """
    import torch.multiprocessing as mp

    mp.start_processes(_spawn_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="spawn")
