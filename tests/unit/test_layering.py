"""The package's layering (.importlinter, explained in docs/architecture.md), checked with import-linter.

The other tests prove the checks can fail: a copy of the package with one import against the layers (the
advantage code importing the trainer) must be refused, naming the offending import; and so must a copy with an
import circle closed by an import that never runs at import time (under ``TYPE_CHECKING``, or inside a function).
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


def copy_tree(dest: Path) -> None:
    for name in ("megatron_pz", "benchmarks"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(REPO / ".importlinter", dest)


def test_a_wrong_import_is_refused(tmp_path):
    copy_tree(tmp_path)
    victim = tmp_path / "megatron_pz" / "algo" / "advantages.py"
    victim.write_text(victim.read_text() + "\nfrom megatron_pz.trainer import setup  # deliberately against the layers\n")
    p = lint(tmp_path)
    assert p.returncode != 0
    assert "megatron_pz.algo.advantages -> megatron_pz.trainer" in p.stdout, p.stdout[-3000:]
    assert "BROKEN" in p.stdout


@pytest.mark.parametrize("closing_import", [
    "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megatron_pz.model.arch import ModelArch\n",
    "\ndef _late():\n    from megatron_pz.model import arch\n    return arch\n",
], ids=["type_checking", "function_level"])
def test_an_import_circle_is_refused(tmp_path, closing_import):
    """model/arch.py imports model/arch_fields.py; an import back, even one that never runs at import time,
    closes a circle the acyclic contract names."""
    copy_tree(tmp_path)
    victim = tmp_path / "megatron_pz" / "model" / "arch_fields.py"
    victim.write_text(victim.read_text() + closing_import)
    p = lint(tmp_path)
    assert p.returncode != 0
    assert "No cycles are allowed in megatron_pz.model." in p.stdout, p.stdout[-3000:]
    assert "BROKEN" in p.stdout
