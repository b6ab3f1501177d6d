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
