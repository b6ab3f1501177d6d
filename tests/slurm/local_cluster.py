"""Real Slurm clusters on this machine for the tests in this folder (tools/slurm_local.sh), and the helpers
their tests share (waiting for a job, reading its log and metrics).

A plain module, not a conftest.py: a second conftest.py would shadow tests/conftest.py for the tests that
``from conftest import ...``. Tests import the fixture: ``from local_cluster import slurm_cluster``.

``slurm_cluster`` (session): one node, localhost. It installs slurm-wlm and munge with apt when they are missing
(root only), starts munged, slurmctld and slurmd with a private config and state folder on free ports, and stops
exactly those daemons (by their pid files) at the end. Without root or apt, the tests skip and say why.

``slurm_netns_cluster`` (module): three nodes, each a slurmd in its own network namespace with its own address
and hostname (``SLURM_LOCAL_NODES=3``). It needs root, ``ip netns``, nsenter/unshare and an installed Slurm
(it does not install one), else the tests skip and say which is missing. Teardown removes the daemons,
namespaces, links and per-namespace hosts files, and fails if any namespace is left.
"""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "slurm_local.sh"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


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
        for f in [self.folder / "slurmctld.log", *sorted(self.folder.glob("slurmd*.log"))]:
            if f.exists():
                tails.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(tails)


def wait_for(cluster: Cluster, job: str, log: Path, timeout_s: float = 600) -> dict[str, str]:
    """The job's final scontrol record; cancels it and fails with its log after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        info = cluster.job(job)
        if info.get("JobState") in FINAL:
            return info
        time.sleep(2)
    cluster.run("scancel", job, check=False)
    raise AssertionError(f"job {job} not finished after {timeout_s}s: {info}\n{tail(log)}\n{cluster.logs()}")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no job log)"


def steps_logged(out: Path) -> list[int]:
    """The step of every line of the run's metrics.jsonl, in order (a step logged twice appears twice)."""
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line] if path.exists() else []


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


NETNS_TOOLS = ("ip", "nsenter", "unshare", "mount", "hostname")


@pytest.fixture(scope="module")
def slurm_netns_cluster(tmp_path_factory):
    """Three Slurm nodes pzn1..pzn3, each in its own network namespace (tools/slurm_local.sh, SLURM_LOCAL_NODES)."""
    if os.geteuid() != 0:
        pytest.skip("the 3-node cluster creates network namespaces and runs Slurm's daemons as root: run as root")
    missing = [b for b in BINARIES + NETNS_TOOLS if shutil.which(b) is None]
    if missing:
        pytest.skip(f"the 3-node cluster needs {', '.join(missing)} (apt-get install slurm-wlm munge iproute2 "
                    f"util-linux)")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"'ip netns' is unavailable here: {(probe.stdout + probe.stderr).strip()[:300]}")
    from megatron_pz.parallel import free_port

    folder = tmp_path_factory.mktemp("slurm3")
    env = {**os.environ, "SLURM_LOCAL_NODES": "3", "SLURM_LOCAL_CTLD_PORT": str(free_port()),
           "SLURM_LOCAL_SLURMD_PORT": str(free_port())}
    cluster, tag = Cluster(folder), ""
    try:
        p = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], env=env, capture_output=True, text=True,
                           timeout=180)
        if (folder / "netns.env").exists():  # what `stop` removes: namespaces <tag>n1.. (checked below)
            tag = (folder / "netns.env").read_text().split("TAG=")[1].split()[0]
        assert p.returncode == 0, f"3-node Slurm did not start:\n{p.stdout}{p.stderr}\n{cluster.logs()}"
        yield cluster
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=180)
    left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if tag and ns.startswith(tag)]
    assert not left, f"network namespaces left behind: {left}"
