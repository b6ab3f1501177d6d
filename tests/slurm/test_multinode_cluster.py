"""slurm/multinode.sbatch (ROLLOUT=embedded) on a real 3-node Slurm cluster built on this machine.

Each node is a slurmd in its own network namespace with its own address and hostname (tools/slurm_local.sh,
SLURM_LOCAL_NODES=3); the filesystem is shared, as OUTPUT_DIR is on a cluster. The job puts
`megatron-pz serve-rollout` on the first node and one torchrun on each of the other two, which rendezvous over
c10d and train with gloo on CPU (one process a node, world size 2); the trainer reaches the server as an external
one and syncs weights through the disk. Mid-run, the time-limit signal (SIGUSR1 to the batch shell) makes the
ranks checkpoint and stop; the job requeues itself and the second run resumes from that checkpoint.

The tiny 2-layer policy keeps a step to seconds; the test took 3-4 minutes on 2 shared cores (slurm/README.md).
"""
import re
import time
from pathlib import Path

import local_cluster
import pytest
from local_cluster import FINAL, steps_logged, tail, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
slurm_netns_cluster = local_cluster.slurm_netns_cluster  # the module fixture (tests/slurm/local_cluster.py)
REPO = Path(__file__).resolve().parents[2]
STEPS = 8  # enough that the signal sent after step 1 lands before the last step
SHRINK = ["train.paragraphs_per_step=2", "train.masks_per_paragraph=2", "train.predictions_per_mask=2",
          "rollout.gen_max_new_tokens=16", "rollout.pred_max_new_tokens=12", "corpus.max_prompt_tokens=200",
          "checkpoint.save_interval=1"]


def test_two_training_nodes_and_a_rollout_node_train_requeue_and_resume(slurm_netns_cluster, tiny_policy, tmp_path):
    cluster = slurm_netns_cluster
    out, log = tmp_path / "run", tmp_path / "multinode-%j.out"
    # PREFLIGHT=0: the pre-flight step is the smoke test's; here it would only add its start-up to both runs.
    env = {**cluster.env, "OUTPUT_DIR": str(out), "ROLLOUT": "embedded", "GPUS_PER_NODE": "1",
           "CONFIG": "examples/quickstart_cpu.yaml", "ROLLOUT_MODEL": tiny_policy, "HEALTH_TIMEOUT": "300",
           "PREFLIGHT": "0", "OMP_NUM_THREADS": "1"}
    job = cluster.run("sbatch", "--parsable", f"--chdir={REPO}", f"--output={log}", "--nodes=3", "--gpus-per-node=0",
                      "--time=01:00:00", str(REPO / "slurm" / "multinode.sbatch"), f"policy.load={tiny_policy}",
                      f"train.steps={STEPS}", *SHRINK, env=env).stdout.strip().split(";")[0]
    log = Path(str(log).replace("%j", job))
    deadline = time.time() + 400
    while not steps_logged(out):
        assert time.time() < deadline, f"no step logged in 400s\n{tail(log)}\n{cluster.logs()}"
        assert cluster.job(job).get("JobState") not in FINAL, tail(log)
        time.sleep(1)
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@T does before the limit
    info = wait_for(cluster, job, log, timeout_s=600)
    body = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log, 80)}"
    assert int(info["Restarts"]) == 1, tail(log, 80)

    # The node split: serve-rollout on the first node, the trainers on the other two.
    (rollout_host, train_hosts), = set(re.findall(r"rollout nodes (\S+) \(embedded, TP 1\); training nodes (\S+ \S+) ",
                                                  body))
    h0, h1 = train_hosts.split()
    assert len({rollout_host, h0, h1}) == 3
    assert (out / "rollout" / "endpoints.txt").read_text().split() == [f"http://{rollout_host}:30000"]
    # Both runs: one rank on each training node, in one gloo process group.
    train_log = (out / "train.log").read_text()
    assert train_log.count(f"process group: 2 ranks on 2 hosts: {h0} [0], {h1} [1] (gloo)") == 2, train_log[-3000:]

    # The stop, the requeue and the resume from the checkpoint the stop wrote.
    assert "SIGUSR1: asking the trainer ranks to checkpoint and stop" in body
    assert "requeueing job" in body and "restart 1 on" in body
    first, second = body.split("restart 1 on", 1)
    stopped = [int(n) for n in re.findall(r"^step (\d+)/", first, re.M)]
    resumed = [int(n) for n in re.findall(r"^step (\d+)/", second, re.M)]
    k = stopped[-1]
    assert 1 <= k < STEPS and stopped == list(range(1, k + 1))
    assert f"resume   after step {k} of {STEPS}" in second
    assert resumed == list(range(k + 1, STEPS + 1))  # continued from the checkpoint, not from step 1
    assert steps_logged(out) == list(range(1, STEPS + 1))  # every step logged once across the two runs
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)

    # The rollout node's server took the trainer's weights from the shared disk in both runs: the restarted
    # server (from ROLLOUT_MODEL, version 0) was brought to a version past the checkpoint's.
    server_log = (out / "rollout" / "logs" / f"rollout-{rollout_host}-30000.log").read_text()
    runs = server_log.split("serve-rollout: listening on")[1:]
    assert len(runs) == 2
    versions = [[int(v) for v in re.findall(r"weights updated to version (\d+) from ", r)] for r in runs]
    assert versions[0] and versions[1] and min(versions[1]) > max(versions[0]), versions
