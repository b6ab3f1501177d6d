"""Create a torch.distributed process group that lives outside the default world (trainer <-> rollout engines).

The trainer already owns a default process group (Megatron's); the weight-broadcast group joins trainer rank 0
with every rollout-engine rank through its own TCP rendezvous. This is the same construction as SGLang's
``init_custom_process_group`` (``sglang/srt/utils/common.py``), so a group made here on the trainer side pairs
with the one SGLang makes on ``/init_weights_update_group``. It also works when no default group exists (the
embedded engine), and with ``gloo`` so the broadcast path is exercised on CPU.
"""
from __future__ import annotations

import datetime
import logging

import torch.distributed as dist

logger = logging.getLogger(__name__)


def init_custom_process_group(
    backend: str,
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Rendezvous at ``tcp://master_address:master_port`` and return the new group (rank 0 hosts the store)."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = datetime.timedelta(seconds=timeout_s)
    init_method = f"tcp://{master_address}:{master_port}"
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    # A PrefixStore keeps this group's keys apart from any other user of the same store.
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, backend_options=None, timeout=timeout
    )
    # Identity map so that `src=0` / `group_src=0` means rank 0 *of this group* (SGLang does the same).
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    logger.info("joined process group %r as rank %d/%d via %s (%s)", group_name, rank, world_size, init_method, backend)
    return pg


def broadcast_from_rank0(tensor, group: dist.ProcessGroup, async_op: bool = False):
    """Broadcast ``tensor`` from rank 0 of ``group`` (works whether or not a default group exists)."""
    return dist.broadcast(tensor, group=group, group_src=0, async_op=async_op)
