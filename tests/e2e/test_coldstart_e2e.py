"""The cold start through the real entry point on the tiny model: the supervised warm-up (train.objective=sft_span)
trains, and a second stage started from its checkpoints gets its weights with a fresh optimizer and schedule."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_e2e import command, metrics, run

pytestmark = pytest.mark.multiproc
FAST = ["train.paragraphs_per_step=2", "train.masks_per_paragraph=2", "random_span.geometric_p=1.0",
        "logging.tensorboard=false", "checkpoint.save_interval=0"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def test_sft_span_trains_then_stage_two_starts_from_its_checkpoint_with_a_fresh_optimizer(tiny_policy, tmp_path):
    one, two = tmp_path / "stage1", tmp_path / "stage2"
    p = run(command(one, tiny_policy, "train.objective=sft_span", "train.steps=3", "optim.lr=3e-3",
                    "optim.lr_decay_style=constant", "sft.generator_samples=true", *FAST))
    assert "sft_span, 3 steps of 2 paragraphs x 2 supervised spans" in p.stdout
    rows = metrics(one)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["count/sft_span"] == 8 and r["train/tokens"] > 0 and r["train/update_skipped"] == 0
        assert r["rollout/sft_spans"] == 4 and r["rollout/sft_span_words_mean"] == 1
        assert r["train/lr"] == 3e-3 and "reward/sft_span" not in r  # no reward: nothing was generated
    # teacher forcing learns: the answers' format tokens ("\boxed{", "}", EOS) recur every step
    losses = [r["train/loss"] for r in rows]
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.5, losses
    assert rows[-1]["train/target_prob"] > rows[0]["train/target_prob"]
    assert rows[-1]["weight_version"] == 3  # synced every step: eval and later stages see the new weights
    assert (one / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    # stage 2: Random-span RLPT from stage 1's checkpoints, another lr
    run(command(two, tiny_policy, f"policy.load={one / 'checkpoints'}", "train.objective=random_span",
                "train.steps=1", "optim.lr=1e-4", "optim.lr_decay_style=constant",
                "reward.pred_reward=plugin_rewards:odd_length", *FAST))
    # the weights it starts from (served as its version 0) are stage 1's last ones, bit for bit
    first, last = weights(two / "weights" / "v00000000"), weights(one / "weights" / "v00000003")
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    # fresh everything else: step count from 0, its own lr schedule, weight version 0 -> 1, corpus from the start
    (row,) = metrics(two)
    assert row["step"] == 1 and row["train/lr"] == 1e-4 and row["weight_version"] == 1
    meta = json.loads((two / "checkpoints" / "iter_0000001" / "megatron_pz.json").read_text())
    assert meta["step"] == 1 and meta["scheduler"]["num_steps"] == 1
    log = (two / "train.log").read_text()
    assert "optimizer, LR schedule, step and corpus position start fresh" in log
    stage1_meta = json.loads((one / "checkpoints" / "iter_0000003" / "megatron_pz.json").read_text())
    assert stage1_meta["scheduler"]["num_steps"] == 3  # what a resume would have continued from


@pytest.mark.slow
def test_a_staged_run_file_chains_the_stages_and_a_rerun_skips_the_finished_ones(tiny_policy, tmp_path):
    """One command, two stages (trainer/stages.py): stage 2 starts from stage 1's weights; rerunning skips both."""
    from test_train_e2e import REPO, SMALL

    staged = tmp_path / "staged.yaml"
    quick = REPO / "examples" / "quickstart_cpu.yaml"
    staged.write_text(
        f"name: two\noutput_dir: {tmp_path / 'out'}\nstages:\n"
        f"  - config: {quick}\n    overrides: [name=warm, policy.load={tiny_policy}, train.objective=sft_span,"
        f" train.steps=2, optim.lr=3e-3]\n"
        f"  - config: {quick}\n    overrides: [name=rl, train.objective=random_span, train.steps=1,"
        f" reward.pred_reward=plugin_rewards:odd_length]\n    heldout: 4\n")
    cmd = [*command(tmp_path / "unused", tiny_policy)[:4], "--config", str(staged), *SMALL, *FAST]
    p = run(cmd)
    one, two = tmp_path / "out" / "warm", tmp_path / "out" / "rl"
    assert "stage 1/2 warm" in p.stdout and "stage 2/2 rl" in p.stdout and "from stage 1's weights" in p.stdout
    assert [r["step"] for r in metrics(one)] == [1, 2] and [r["step"] for r in metrics(two)] == [1]
    # stage 2 scored held out at its start (stage 1's weights) and its end, one line with the paired change
    change = [x for x in p.stdout.splitlines() if "held-out p(span) on 4 validation spans" in x]
    assert len(change) == 1 and "iteration 1" in change[0] and "95 % [" in change[0], p.stdout[-3000:]
    start = json.loads((two / "heldout" / "start.json").read_text())
    assert start["iteration"] == 2 and start["max_abs_dw"] == 0.0 and len(start["records"]) == 4
    first, last = weights(two / "weights" / "v00000000"), weights(one / "weights" / "v00000002")
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    p = run(cmd)
    assert p.stdout.count("done earlier") == 2 and len(metrics(two)) == 1


def test_staged_run_file_errors_name_the_culprit(tmp_path):
    from megatron_pz.errors import ConfigError
    from megatron_pz.trainer.stages import plan_stages

    f = tmp_path / "s.yaml"
    with pytest.raises(ConfigError, match="name, output_dir and stages only"):
        plan_stages(f, {"stages": ["a.yaml"], "train": {}}, [])
    with pytest.raises(ConfigError, match="non-empty list"):
        plan_stages(f, {"stages": []}, [])
    with pytest.raises(ConfigError, match=r"stages\[0\].config: no run file"):
        plan_stages(f, {"stages": ["missing.yaml"]}, [])
    with pytest.raises(ConfigError, match=r"stages\[0\] must be"):
        plan_stages(f, {"stages": [{"config": "a.yaml", "steps": 3}]}, [])
    for bad in (-1, True, "64"):
        with pytest.raises(ConfigError, match=r"stages\[0\].heldout must be a number of held-out items"):
            plan_stages(f, {"stages": [{"config": "a.yaml", "heldout": bad}]}, [])
    # on the command line output_dir is the staged run's folder and policy.load the first stage's weights
    from test_train_e2e import REPO

    quick = str(REPO / "examples" / "quickstart_cpu.yaml")
    one, two = plan_stages(f, {"stages": [quick, {"config": quick, "overrides": ["name=b"]}]},
                           [f"output_dir={tmp_path / 'root'}", "policy.load=/w", "train.steps=2"])
    assert one.output_dir == tmp_path / "root" / "quickstart_cpu" and two.output_dir == tmp_path / "root" / "b"
    assert "policy.load=/w" in one.overrides and f"policy.load={one.output_dir / 'checkpoints'}" in two.overrides
    assert "policy.load=/w" not in two.overrides and one.steps == two.steps == 2
    assert (one.start, two.start) == ("/w", str(one.output_dir / "checkpoints")) and one.heldout == two.heldout == 0
    _, scored = plan_stages(f, {"stages": [quick, {"config": quick, "overrides": ["name=b"], "heldout": 64}]}, [])
    assert scored.heldout == 64
