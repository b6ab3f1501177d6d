"""A real single-node Slurm cluster on localhost for the tests in this folder (tools/slurm_local.sh).

A plain module, not a conftest.py: a second conftest.py would shadow tests/conftest.py for the tests that
``from conftest import ...``. Tests import the fixture: ``from local_cluster import slurm_cluster``.

The session fixture installs slurm-wlm and munge with apt when they are missing (root only), starts munged,
slurmctld and slurmd with a private config and state folder on free ports, and stops exactly those daemons
(by their pid files) at the end. Without root or apt, the tests skip and say why.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "slurm_local.sh"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=120, **kw)
        if check and p.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's record of a job as key -> value (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def logs(self) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log"):
            f = self.folder / name
            if f.exists():
                tails.append(f"--- {name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(tails)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if not all(shutil.which(b) for b in BINARIES):
        if shutil.which("apt-get") is None:
            pytest.skip("Slurm is not installed and apt-get is unavailable: install slurm-wlm and munge to run "
                        "the Slurm tests (bash tools/slurm_local.sh install)")
        if os.geteuid() != 0:
            pytest.skip("Slurm is not installed; installing slurm-wlm and munge with apt needs root")
        p = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=1200)
        if p.returncode:
            pytest.skip(f"could not install slurm-wlm/munge with apt: {(p.stdout + p.stderr)[-800:]}")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    from megatron_pz.parallel import free_port

    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_CTLD_PORT": str(free_port()), "SLURM_LOCAL_SLURMD_PORT": str(free_port())}
    p = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], env=env, capture_output=True, text=True,
                       timeout=180)
    cluster = Cluster(folder)
    try:
        assert p.returncode == 0, f"local Slurm did not start:\n{p.stdout}{p.stderr}\n{cluster.logs()}"
        yield cluster
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)
