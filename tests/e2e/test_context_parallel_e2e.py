"""A context-parallel launch on CPU (torchrun, 2 processes, parallel.context_parallel_size=2) is refused before
any work: every rank prints one line naming the key and exits with status 2, before any model is built."""
import subprocess

import pytest
from test_train_e2e import REPO, command, env

pytestmark = pytest.mark.multiproc


def test_cp2_is_refused_in_one_line(tiny_policy, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(command(out, tiny_policy, "parallel.context_parallel_size=2", "model.transformer_impl=local",
                               nproc=2), capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    text = p.stdout + p.stderr
    lines = [line for line in text.splitlines() if line.startswith("megatron_pz.train: error: ")]
    assert p.returncode != 0 and len(lines) == 2, text[-3000:]  # one line from each rank
    assert all("parallel.context_parallel_size=2 needs Transformer Engine" in line for line in lines)
    assert "exitcode  : 2" in text  # torchrun's report of the ranks' status
    assert f'File "{REPO / "megatron_pz"}' not in text  # no traceback of ours (torchrun prints its own)
    assert not (out / "checkpoints").exists()
