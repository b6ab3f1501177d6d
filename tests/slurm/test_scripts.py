"""The sbatch scripts that need GPUs or several nodes, run by bash against stand-ins for srun/scontrol.

The stand-in ``srun`` records its arguments; for the SGLang launcher step it writes the per-node endpoint
files, for the router it listens on the router port, and anything else (the trainer, the signal step) it runs
here as if on the first node of ``--nodelist``. ``$PYTHON`` is a stand-in torchrun whose one child "rank"
records what it was started with and waits for SIGUSR1. So the scripts' own logic is what is tested: node
split, rendezvous, overrides, GPU slicing, signals reaching only the ranks, requeue. Real Slurm semantics
(steps, --overlap, signal delivery, requeue) are covered by test_smoke.py.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch")) + [REPO / "slurm" / "common.sh",
                                                        REPO / "tools" / "slurm_local.sh"]

FAKE_SRUN = r'''#!PYTHON
import json, os, re, socket, subprocess, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(["srun"] + args) + "\n")
opts, i = {}, 0
while i < len(args) and args[i].startswith("-"):
    key, _, val = args[i].partition("=")
    opts[key] = val
    i += 1
cmd = args[i:]
text = " ".join(cmd)
if "megatron_pz.rollout.launcher" in text:  # launch_sglang.sh's step: one endpoints file per rollout node
    template = re.search(r'--endpoints-file "([^"]+)"', text).group(1)
    for node in range(int(opts["--nodes"])):
        with open(template.replace("$SLURM_NODEID", str(node)), "w") as f:
            f.write(f"http://rollout{node}:30000\n")
    time.sleep(3600)
elif "sglang_router.launch_router" in text:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(cmd[cmd.index("--port") + 1])))
    s.listen()
    time.sleep(3600)
else:  # run it here, as the first node of --nodelist
    node = opts.get("--nodelist", "node0").split(",")[0]
    env = dict(os.environ, SLURMD_NODENAME=node, SLURM_NODEID="0")
    out = opts.get("--output")
    stdout = open(out.replace("%n", node), "w") if out else None
    sys.exit(subprocess.call(cmd, env=env, stdout=stdout))
'''

FAKE_SCONTROL = r'''#!/usr/bin/env bash
printf '["scontrol", "%s", "%s"]\n' "$1" "${2:-}" >> "$FAKE_LOG"
# One write(2), as scontrol's buffered stdio does: launch_sglang.sh reads it through `head` under pipefail, and
# bash's printf writes piecewise, so head could exit early and SIGPIPE the writer.
if [ "$1 $2" = "show hostnames" ]; then cat <<< "$(printf '%s\n' $FAKE_NODES)"; fi
'''

# "torchrun": records its argv, CUDA_VISIBLE_DEVICES and rollout API key, starts one rank, waits for it. The rank installs a
# SIGUSR1 handler (as the trainer does) and waits up to FAKE_RANK_WAIT seconds for it.
FAKE_TORCHRUN = r'''#!PYTHON
import json, os, subprocess, sys
rec = {"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
       "key": os.environ.get("MEGATRON_PZ_ROLLOUT_API_KEY")}
with open(os.environ["FAKE_TRAINER"], "w") as f:
    json.dump(rec, f)
rank = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
open(os.environ["FAKE_TRAINER"] + ".rank", "w").write("started")
deadline = time.time() + float(os.environ.get("FAKE_RANK_WAIT", "0"))
while not got and time.time() < deadline:
    time.sleep(0.05)
open(os.environ["FAKE_TRAINER"] + ".rank", "w").write("USR1" if got else "done")
"""
sys.exit(subprocess.call([sys.executable, "-c", rank]))
'''


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    p = subprocess.run(["shellcheck", "-s", "bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("fakepython", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(body.replace("#!PYTHON", f"#!{sys.executable}"))
        (bin_dir / name).chmod(0o755)
    log, trainer = tmp_path / "calls.jsonl", tmp_path / "trainer.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "FAKE_TRAINER": str(trainer), "PYTHON": str(bin_dir / "fakepython"), "PZ_ROOT": str(REPO),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "fake[1-3]",
           "OUTPUT_DIR": str(tmp_path / "run"), "PREFLIGHT": "0", "PZ_REQUEUE_WAIT": "0",
           "ROUTER_PORT": str(port), "CONFIG": "examples/quickstart_cpu.yaml"}

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls, trainer


def _srun_with(calls, needle):
    return [c for c in calls() if c[0] == "srun" and any(needle in a for a in c)]


def test_multinode_splits_nodes_and_launches_rollout_router_and_training(fake):
    env, calls, trainer = fake
    env.update(FAKE_NODES="localhost trainA trainB", SLURM_JOB_NUM_NODES="3", ROLLOUT_MODEL="/ckpt/hf",
               SLURM_JOB_NAME="pz-multinode")
    p = subprocess.run(["bash", str(REPO / "slurm" / "multinode.sbatch"), "train.steps=5"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    launcher = _srun_with(calls, "megatron_pz.rollout.launcher")[0]
    assert "--nodes=1" in launcher and "--nodelist=localhost" in launcher
    assert launcher[launcher.index("--num-servers") + 1] == "8"
    router = _srun_with(calls, "sglang_router.launch_router")[0]
    assert "--nodelist=localhost" in router and "http://rollout0:30000" in router
    train = _srun_with(calls, "megatron_pz.train")[0]
    assert "--nodes=2" in train and "--nodelist=trainA,trainB" in train and "pz-trainer" in train
    rec = json.loads(trainer.read_text())
    argv = rec["argv"]
    assert argv[:2] == ["-m", "torch.distributed.run"]
    for flag in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=trainA:29500"):
        assert flag in argv
    run = env["OUTPUT_DIR"]
    assert argv[argv.index("-m", 2):][:2] == ["-m", "megatron_pz.train"]
    assert {f"output_dir={run}", "rollout.backend=sglang", f"rollout.endpoints_file={run}/rollout/endpoints.txt",
            "train.steps=5"} <= set(argv)
    # the trainer recorded its pid for targeted signals: "children" = torchrun's children are the ranks
    pid_file = next(Path(run, ".pids").glob("*/trainA.pid"))
    assert pid_file.read_text().split() == [str(rec["pid"]), "children"]
    assert ["scontrol", "requeue", "4242"] not in calls()


def test_multinode_embedded_starts_serve_rollout_and_syncs_through_the_disk(fake):
    env, calls, trainer = fake
    env.update(FAKE_NODES="roll0 trainA trainB", SLURM_JOB_NUM_NODES="3", ROLLOUT_MODEL="/ckpt/hf",
               ROLLOUT="embedded", GPUS_PER_NODE="1")
    env.pop("MEGATRON_PZ_ROLLOUT_API_KEY", None)
    p = subprocess.run(["bash", str(REPO / "slurm" / "multinode.sbatch")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    run = env["OUTPUT_DIR"]
    launcher = _srun_with(calls, "megatron_pz.rollout.launcher")[0]
    assert "--nodelist=roll0" in launcher
    value = lambda flag: launcher[launcher.index(flag) + 1]  # noqa: E731
    assert (value("--kind"), value("--num-servers"), value("--weights-dir")) == ("embedded", "1", f"{run}/weights")
    assert "--gpus-per-server" not in launcher and Path(run, "weights").is_dir()
    assert not _srun_with(calls, "sglang_router")
    train = _srun_with(calls, "megatron_pz.train")[0]
    assert {"--nodes=2", "--ntasks=2", "--nodelist=trainA,trainB"} <= set(train)
    rec = json.loads(trainer.read_text())
    assert {"--nnodes=2", "--nproc-per-node=1", "--rdzv-endpoint=trainA:29500"} <= set(rec["argv"])
    assert {"rollout.backend=sglang", f"rollout.endpoints_file={run}/rollout/endpoints.txt",
            "rollout.weight_sync=disk", f"rollout.weights_dir={run}/weights"} <= set(rec["argv"])
    # A key was made for the servers on 0.0.0.0 and reached the trainer through the environment, on no argv.
    assert rec["key"] and len(rec["key"]) == 32
    assert not any(rec["key"] in arg for call in calls() for arg in call)
    assert "rollout nodes roll0 (embedded, TP 1); training nodes trainA trainB (2 processes)" in p.stdout


def test_multinode_usr1_reaches_only_the_ranks_then_requeues(fake):
    env, calls, trainer = fake
    env.update(FAKE_NODES="localhost trainA", SLURM_JOB_NUM_NODES="2", ROLLOUT_MODEL="/ckpt/hf", ROUTER="0",
               FAKE_RANK_WAIT="60")
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "multinode.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    rank = Path(str(trainer) + ".rank")
    deadline = time.time() + 60
    while not (rank.exists() and rank.read_text() == "started"):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@T does
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert rank.read_text() == "USR1"  # the rank got it; "torchrun" survived (it exited 0 after its rank)
    signal_step = _srun_with(calls, "pz-signal")[0]
    assert "--overlap" in signal_step and "--nodelist=trainA" in signal_step
    assert ["scontrol", "requeue", "4242"] in calls() and "requeueing job 4242" in out


def test_single_node_sglang_gives_the_first_gpus_to_rollout_and_the_rest_to_training(fake):
    env, calls, trainer = fake
    env.update(FAKE_NODES="gpu01", SLURM_JOB_NUM_NODES="1", ROLLOUT="sglang", ROLLOUT_GPUS="4",
               ROLLOUT_MODEL="/ckpt/hf", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    p = subprocess.run(["bash", str(REPO / "slurm" / "single_node.sbatch")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    launcher = _srun_with(calls, "megatron_pz.rollout.launcher")[0]
    assert launcher[launcher.index("--num-servers") + 1] == "4"
    rec = json.loads(trainer.read_text())
    assert rec["cuda"] == "4,5,6,7"
    assert "--standalone" in rec["argv"] and "--nproc-per-node=4" in rec["argv"]
    assert f"rollout.endpoints_file={env['OUTPUT_DIR']}/rollout/endpoints.txt" in rec["argv"]


def test_scripts_refuse_bad_settings_before_launching(fake):
    env, calls, _ = fake
    env.update(FAKE_NODES="onlyone", SLURM_JOB_NUM_NODES="1", ROLLOUT_MODEL="/ckpt/hf")
    p = subprocess.run(["bash", str(REPO / "slurm" / "multinode.sbatch")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "training needs at least one" in p.stdout
    env.update(ROLLOUT="sglang", ROLLOUT_GPUS="8")
    p = subprocess.run(["bash", str(REPO / "slurm" / "single_node.sbatch")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "leaves no GPU for training" in p.stdout
    assert not _srun_with(calls, "megatron_pz")
