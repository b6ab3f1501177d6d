"""Checkpoints cross Megatron-Core releases both ways: written under this interpreter's release, read under the
other's, and the reverse. The other interpreter is ``$MEGATRON_PZ_OTHER_PYTHON`` (``tools/test_mcore19.sh`` sets
it to the Python 3.11 / Megatron-Core 0.16.1 one when it runs under 3.12 / 0.19); without it the test skips.

For each direction (``ckpt_worker.py`` has the details):
* our checkpoint (converted at TP2, read at TP1) exports to HF bit for bit;
* a Megatron-LM-layout checkpoint (``dist_checkpointing.save`` with ``args``, no megatron_pz.json; under 0.17+
  that means no ``common.pt`` either) has its architecture read from ``args`` and its tensors loaded exactly;
* a training checkpoint resumes with its optimizer state: the second step matches the writer's second step, and
  a fresh optimizer does not (the control that shows the check can fail).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "ckpt_worker.py"
OTHER = os.environ.get("MEGATRON_PZ_OTHER_PYTHON")
# Same torch release on both sides, but not the same build (CPU wheel on 3.11, CUDA wheel on 3.12): the resumed
# step may differ by float rounding. A lost optimizer state moves the weights by ~lr = 1e-3 (the control).
RESUME_TOL = 1e-6


def _run(python: str, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("MEGATRON_PZ_OTHER_PYTHON", None)
    p = subprocess.run([python, str(WORKER), *args], capture_output=True, text=True, timeout=1200, env=env)
    assert p.returncode == 0, f"{python} {' '.join(args)}: exit {p.returncode}\n{p.stderr[-4000:]}"


def _version(python: str) -> str:
    return subprocess.run([python, "-c", "from megatron.core.package_info import __version__ as v; print(v)"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not OTHER, reason="set MEGATRON_PZ_OTHER_PYTHON to an interpreter with another Megatron-Core "
                                      "(tools/test_mcore19.sh does)")
@pytest.mark.parametrize("direction", ["this_to_other", "other_to_this"])
def test_checkpoints_cross_megatron_core_releases(tmp_path, direction):
    writer, reader = (sys.executable, OTHER) if direction == "this_to_other" else (OTHER, sys.executable)
    assert _version(writer) != _version(reader), "both interpreters have the same Megatron-Core"
    out, result = tmp_path / "ckpts", tmp_path / "result.json"
    _run(writer, "write", str(out))
    _run(reader, "read", str(out), str(result))
    r = json.loads(result.read_text())
    print(f"\n{r['written_by']} -> {r['read_by']}: {json.dumps(r)}")
    assert r["ours"]["exact"], r["ours"]
    assert r["mlm"]["exact"] and r["mlm"]["iteration"] == 10 and r["mlm"]["vocab_size"] == 300, r["mlm"]
    assert r["mlm_export_vocab_rows"] == 300
    assert r["train"]["resume_step2_max_abs_diff"] <= RESUME_TOL, r["train"]
    assert r["train"]["fresh_optimizer_step2_max_abs_diff"] > 100 * RESUME_TOL, r["train"]
