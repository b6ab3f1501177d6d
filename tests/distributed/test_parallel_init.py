"""Parallel init over gloo: DP and CP groups come out of Megatron's parallel_state as configured."""
import json

import pytest

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc


def _groups_worker(tp: int, cp: int, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp))
    row = {"rank": dist.get_rank(), "backend": dist.get_backend(), "tp": ps.get_tensor_model_parallel_world_size(),
           "cp": ps.get_context_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


@pytest.mark.parametrize("tp,cp,dp", [(1, 1, 2), (2, 1, 1), (1, 2, 1)])
def test_world_of_two(tmp_path, tp, cp, dp):
    out = tmp_path / "groups.json"
    spawn_local(_groups_worker, 2, (tp, cp, str(out)))
    rows = json.loads(out.read_text())
    assert [r["rank"] for r in rows] == [0, 1]
    assert all((r["tp"], r["cp"], r["dp"], r["backend"]) == (tp, cp, dp, "gloo") for r in rows)


_CONVERT_IN_PROCESS = r"""
import os, sys
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron_pz import checkpoint as ckpt
from megatron_pz.convert.api import hf_to_mcore, mcore_to_hf
from megatron_pz.parallel import ParallelConfig, init_distributed

hf, work = sys.argv[1], sys.argv[2]

def clean(where):
    # What a library call must leave behind in a process that had no world: no process group, no Megatron
    # groups, and no MASTER_PORT that later subprocesses would inherit (and collide with).
    assert not dist.is_initialized(), where + ": left a process group"
    assert not ps.model_parallel_is_initialized(), where + ": left Megatron's groups"
    assert "MASTER_PORT" not in os.environ and "MASTER_ADDR" not in os.environ, where + ": exported MASTER_*"

hf_to_mcore(hf, work + "/a")
clean("hf_to_mcore")
mcore_to_hf(work + "/a", work + "/hf_a")
clean("mcore_to_hf")
hf_to_mcore(hf, work + "/b")  # a second world of one after the first: no stale store or port
clean("hf_to_mcore again")

# A caller with a world of its own (the trainer's rank 0 filling the SmolLM2 cache): a conversion at another
# layout runs in a world of its own and leaves the caller's groups as they were.
init_distributed(ParallelConfig())
groups = (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size())
hf_to_mcore(hf, work + "/tp2", tp=2)
assert dist.is_initialized() and ps.model_parallel_is_initialized(), "the caller's world was torn down"
assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size()) == groups
assert ckpt.resolve(work + "/tp2").iteration == 0
print("OK")
"""


def test_conversions_leave_the_calling_process_as_they_found_it(tiny_llama_hf, tmp_path):
    """hf_to_mcore / mcore_to_hf in a plain process (the SmolLM2 cache, `megatron-pz eval --load ckpt`) used to
    leave a live process group and an exported MASTER_PORT: every later converter or trainer subprocess then died
    with EADDRINUSE, which a warm model cache hid."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", _CONVERT_IN_PROCESS, tiny_llama_hf, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    assert (tmp_path / "hf_a" / "config.json").is_file()
