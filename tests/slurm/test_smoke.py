"""slurm/smoke.sbatch under a real (local, single-node) Slurm: the CPU quickstart through sbatch + srun.

The job runs the real entry point on the real quickstart config (SmolLM2-135M, embedded rollout server); only
the batch is shrunk (fewer paragraphs/masks/predictions, shorter responses) so a step takes seconds.
"""
import time
from pathlib import Path

import local_cluster
import pytest
from local_cluster import FINAL, steps_logged, wait_for
from local_cluster import tail as _tail

pytestmark = pytest.mark.multiproc
slurm_cluster = local_cluster.slurm_cluster  # the session fixture (tests/slurm/local_cluster.py)
REPO = Path(__file__).resolve().parents[2]
SHRINK = ["train.paragraphs_per_step=2", "train.masks_per_paragraph=2", "train.predictions_per_mask=2",
          "rollout.gen_max_new_tokens=16", "rollout.pred_max_new_tokens=12", "corpus.max_prompt_tokens=200"]


def submit(cluster, tmp_path: Path, steps: int) -> tuple[str, Path, Path]:
    out, log = tmp_path / "run", tmp_path / "smoke-%j.out"
    env = {**cluster.env, "OUTPUT_DIR": str(out), "STEPS": str(steps), "OMP_NUM_THREADS": "2"}
    job = cluster.run("sbatch", "--parsable", f"--chdir={REPO}", f"--output={log}", "--time=00:15:00",
                      str(REPO / "slurm" / "smoke.sbatch"), *SHRINK, env=env).stdout.strip().split(";")[0]
    return job, out, Path(str(log).replace("%j", job))


def test_smoke_job_completes_its_steps(slurm_cluster, smollm2, tmp_path):
    job, out, log = submit(slurm_cluster, tmp_path, steps=2)
    info = wait_for(slurm_cluster, job, log)
    text = _tail(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert steps_logged(out) == [1, 2]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    body = log.read_text()
    assert "pre-flight OK" in body and "trainer exited with 0" in body
    assert "VERDICT: OK" in (out / "logs" / "preflight.log").read_text()


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, smollm2, tmp_path):
    """What --signal=B:USR1@T does before the time limit, sent by hand: stop after a checkpoint, requeue,
    resume from it, finish. (scancel --batch --signal=USR1 delivers it to the batch shell, as --signal=B: does.)"""
    job, out, log = submit(slurm_cluster, tmp_path, steps=3)
    deadline = time.time() + 300
    while not steps_logged(out):
        assert time.time() < deadline, f"no step logged in 300s\n{_tail(log)}"
        assert slurm_cluster.job(job).get("JobState") not in FINAL, _tail(log)
        time.sleep(1)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = wait_for(slurm_cluster, job, log)
    body = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    assert int(info["Restarts"]) == 1
    assert "SIGUSR1: asking the trainer ranks to checkpoint and stop" in body
    assert "requeueing job" in body and "restart 1" in body
    assert "resumed from" in body
    assert steps_logged(out) == [1, 2, 3]  # every step logged once across the two runs
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
