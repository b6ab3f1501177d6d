"""The package's layering (.importlinter, explained in docs/architecture.md), checked with import-linter.

The second test proves the check can fail: a copy of the package with one import against the layers (the
advantage code importing the trainer) must be refused, naming the offending import.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = shutil.which("lint-imports") or pytest.skip("import-linter not installed (the [dev] extra)",
                                                   allow_module_level=True)


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's packages, ahead of any installed copy
    return subprocess.run([LINT, "--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    p = lint(REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_a_wrong_import_is_refused(tmp_path):
    for name in ("megatron_pz", "benchmarks"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(REPO / ".importlinter", tmp_path)
    victim = tmp_path / "megatron_pz" / "algo" / "advantages.py"
    victim.write_text(victim.read_text() + "\nfrom megatron_pz.trainer import setup  # deliberately against the layers\n")
    p = lint(tmp_path)
    assert p.returncode != 0
    assert "megatron_pz.algo.advantages -> megatron_pz.trainer" in p.stdout, p.stdout[-3000:]
    assert "BROKEN" in p.stdout
