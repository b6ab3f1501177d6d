"""The main job's console is for people (logs.library_output): a 1-step run of the README's quickstart (both
stages, each in its own process with its embedded rollout server), on the tiny policy, shows our set-up lines, our
progress bar and one line per step; library warnings and third-party progress bars are in the run's train.log files.

Warnings are made on purpose so that the test can fail: the reward plug-in ``plugin_noisy`` warns and draws a bar
when it is imported, which happens while each process reads the config, before a log file exists. The held-out
scoring after stage 2 is left out (a minute of process start-ups): its processes write to heldout.log, never to the
console, and test_coldstart_e2e's staged test runs it."""
import re
import subprocess
import sys

import pytest
import yaml

from test_train_e2e import REPO, env

pytestmark = pytest.mark.multiproc
OUR_BAR = re.compile(r"^\s*\d+%\|")  # logs.console.ProgressBar's bar_format starts with the percentage


def staged_quickstart(tmp_path):
    """examples/quickstart.yaml with absolute stage paths and without the held-out scoring."""
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    for stage in doc["stages"]:
        stage["config"] = str(REPO / "examples" / stage["config"])
        stage.pop("heldout", None)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_main_jobs_console_shows_no_library_warnings_or_bars(tiny_policy, tmp_path):
    out = tmp_path / "quickstart"
    cmd = [sys.executable, "-m", "megatron_pz.cli", "train", "--config", str(staged_quickstart(tmp_path)),
           f"output_dir={out}", f"policy.load={tiny_policy}", "train.steps=1",
           "reward.pred_reward=plugin_noisy:odd_length", "rollout.gen_max_new_tokens=8"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(), cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    lines, err = p.stdout.splitlines(), p.stderr.replace("\r", "\n").splitlines()  # a bar redraws after \r
    assert not [line for line in lines + err if "Warning" in line or "plugin_noisy" in line], lines + err
    # stderr: our progress bar and our own one-line messages only
    others = [line for line in err if line.strip() and not OUR_BAR.match(line) and not line.startswith("megatron-pz: ")]
    assert not others, others
    assert [line.split(":")[0] for line in lines if line.startswith("stage ")][:2] == [
        "stage 1/2 smollm2_cloze_warmup", "stage 2/2 smollm2_cloze_pretrainzero"]
    assert sum(line.startswith("step 1/1 |") for line in lines) == 2
    assert sum(bool(OUR_BAR.match(line)) for line in err) >= 2  # our bar stays
    # the deliberate warnings and bar: in the stage runner's log and in each stage's (held until it existed)
    logs = [out / "train.log", out / "smollm2_cloze_warmup" / "train.log",
            out / "smollm2_cloze_pretrainzero" / "train.log"]
    for log in (f.read_text() for f in logs):
        assert "UserWarning: plugin_noisy: a deliberate UserWarning at import" in log
        assert "FutureWarning: plugin_noisy: a deliberate FutureWarning at import" in log
        assert "plugin_noisy bar: 100%" in log
    assert "stage 2/2 smollm2_cloze_pretrainzero" in logs[0].read_text()  # the runner's lines are logged too
