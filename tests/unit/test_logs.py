"""Run logging: hand-computed sample metrics, metrics.jsonl robustness and resume, TensorBoard round trip, timer."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_pz.logs import console as log_console
from megatron_pz.logs import timer as log_timer
from megatron_pz.logs import RunLogger, StepTimer, sample_histograms, sample_scalars
from megatron_pz.types import Sample, Status, Task


def _s(task, group, n_tokens, reward, status=Status.COMPLETED, finish_reason=None, **metadata):
    return Sample(task, group, response_ids=[7] * n_tokens, reward=reward, status=status,
                  finish_reason=finish_reason, metadata=metadata)


def _step_samples():
    return [
        # generator group: valid 3-word span, invalid mask (truncated), valid 1-word span that was truncated and
        # then DAPO-filtered, and an aborted request that never got a mask
        _s(Task.MASK_GEN, "g", 4, 0.75, mask_valid=True, span="New York City", paragraph="long text"),
        _s(Task.MASK_GEN, "g", 10, 0.0, Status.TRUNCATED, "length", mask_valid=False, span=None),
        _s(Task.MASK_GEN, "g", 6, 0.5, Status.FILTERED, "length", mask_valid=True, span="Paris"),
        _s(Task.MASK_GEN, "g", 0, None, Status.ABORTED, "abort"),
        # predictor group for one mask: 2 of 4 exact matches
        _s(Task.MASK_PRED, "g/mask0", 2, 1.0),
        _s(Task.MASK_PRED, "g/mask0", 3, 0.0),
        _s(Task.MASK_PRED, "g/mask0", 5, 1.0),
        _s(Task.MASK_PRED, "g/mask0", 6, 0.0),
    ]


# ----------------------------------------------------------------------------- pure metrics
def test_sample_scalars_hand_computed():
    got = sample_scalars(_step_samples())
    expected = {
        "count/mask_gen": 4.0,
        "reward/mask_gen": (0.75 + 0.0 + 0.5) / 3,  # the aborted sample has no reward
        "length/mask_gen_mean": (4 + 10 + 6) / 3,  # generated = COMPLETED, TRUNCATED, FILTERED
        "length/mask_gen_max": 10.0,
        "trunc_rate/mask_gen": 2 / 4,  # TRUNCATED + FILTERED with finish_reason "length"
        "abort_rate/mask_gen": 1 / 4,
        "filtered_frac/mask_gen": 1 / 4,
        "trained_tokens/mask_gen": 0.0,  # no advantages yet: nothing enters the loss (see the next test)
        "groups/mask_gen": 1.0,  # group "g": three scored generated samples (the aborted one has no reward)
        "groups_mixed/mask_gen": 1.0,  # rewards 0.75, 0.0, 0.5 are not all equal
        "groups_mixed_frac/mask_gen": 1.0,
        "mask/valid_rate": 2 / 3,  # over the 3 samples that carry mask_valid
        "mask/span_words_mean": (3 + 1) / 2,
        "mask/span_chars_mean": (13 + 5) / 2,
        "count/mask_pred": 4.0,
        "reward/mask_pred": 0.5,
        "acc/mask_pred": 0.5,
        "length/mask_pred_mean": (2 + 3 + 5 + 6) / 4,
        "length/mask_pred_max": 6.0,
        "trunc_rate/mask_pred": 0.0,
        "abort_rate/mask_pred": 0.0,
        "filtered_frac/mask_pred": 0.0,
        "trained_tokens/mask_pred": 0.0,
        "groups/mask_pred": 1.0,
        "groups_mixed/mask_pred": 1.0,  # 1, 0, 1, 0
        "groups_mixed_frac/mask_pred": 1.0,
    }
    assert got.keys() == expected.keys()  # no random_span keys: that task had no samples
    assert got == pytest.approx(expected, rel=1e-12)


def test_mixed_groups_count_only_groups_whose_rewards_differ():
    samples = [_s(Task.MASK_PRED, "a", 2, 1.0), _s(Task.MASK_PRED, "a", 2, 0.0),  # mixed
               _s(Task.MASK_PRED, "b", 2, 0.0), _s(Task.MASK_PRED, "b", 2, 0.0),  # all wrong: DAPO drops it
               _s(Task.MASK_PRED, "c", 2, 1.0), _s(Task.MASK_PRED, "c", 2, 1.0),  # all right: dropped too
               _s(Task.MASK_PRED, "d", 0, None, Status.ABORTED, "abort")]  # never scored: not a group
    got = sample_scalars(samples)
    assert (got["groups/mask_pred"], got["groups_mixed/mask_pred"]) == (3.0, 1.0)
    assert got["groups_mixed_frac/mask_pred"] == pytest.approx(1 / 3)


def test_trained_tokens_count_the_response_tokens_of_the_samples_in_the_loss():
    samples = _step_samples()
    for s, a in zip(samples, [0.9, -1.2, 0.0, None, 1.0, -1.0, 1.0, -1.0]):
        s.advantage = a
    got = sample_scalars(samples)
    # generator: the completed (4) and truncated (10) samples; the DAPO-filtered one and the aborted one are out
    assert (got["trained_tokens/mask_gen"], got["trained_tokens/mask_pred"]) == (14.0, 2 + 3 + 5 + 6)
    samples[5].response_ids = []  # a response without tokens trains nothing
    assert sample_scalars(samples)["trained_tokens/mask_pred"] == 2 + 5 + 6


def test_entropy_estimate_is_minus_the_mean_rollout_logprob_of_generated_tokens():
    a = _s(Task.RANDOM_SPAN, "a", 2, 1.0)
    a.rollout_logprobs = [-0.5, -1.5]
    b = _s(Task.RANDOM_SPAN, "a", 1, 0.0, Status.TRUNCATED, "length")
    b.rollout_logprobs = [-3.0]
    c = _s(Task.RANDOM_SPAN, "a", 0, None, Status.ABORTED, "abort")  # not generated: not counted
    c.rollout_logprobs = [-100.0]
    assert sample_scalars([a, b, c])["entropy/random_span"] == pytest.approx((0.5 + 1.5 + 3.0) / 3)


def test_sample_scalars_skips_empty_sets():
    assert sample_scalars([]) == {}
    assert sample_histograms([]) == {}
    pending = [Sample(Task.RANDOM_SPAN, "r")]  # not generated, no reward: only counts and rates
    assert sample_scalars(pending) == {"count/random_span": 1.0, "trunc_rate/random_span": 0.0,
                                       "abort_rate/random_span": 0.0, "filtered_frac/random_span": 0.0,
                                       "trained_tokens/random_span": 0.0}
    assert sample_histograms(pending) == {}


def test_sample_histograms():
    assert sample_histograms(_step_samples()) == {
        "hist/reward_mask_gen": [0.75, 0.0, 0.5],
        "hist/length_mask_gen": [4.0, 10.0, 6.0],
        "hist/length_mask_pred": [2.0, 3.0, 5.0, 6.0],
    }


def test_step_timer_accumulates(monkeypatch):
    clock = iter([100.0,  # reset
                  101.0, 103.0,  # rollout 2 s
                  103.5, 104.0,  # train 0.5 s
                  104.0, 105.0,  # rollout again 1 s
                  105.0, 105.25,  # sync 0.25 s
                  106.0,  # summary
                  200.0,  # reset
                  201.0])  # summary
    monkeypatch.setattr(log_timer, "perf_counter", lambda: next(clock))
    timer = StepTimer()
    with timer("rollout"):
        pass
    with timer("train"):
        pass
    with timer("rollout"):
        pass
    with timer("sync"):
        pass
    assert timer.summary() == {"time/rollout": 3.0, "time/train": 0.5, "time/sync": 0.25, "time/step": 6.0}
    timer.reset()
    assert timer.summary() == {"time/step": 1.0}
    with pytest.raises(ValueError), timer("step"):
        pass


# ----------------------------------------------------------------------------- metrics.jsonl
def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_converts_weird_values(tmp_path):
    log = RunLogger(tmp_path, total_steps=3, tensorboard=False, progress_bar=False)
    weird = {"nan": math.nan, "inf": -math.inf, "t0": torch.tensor(0.5), "np": np.float32(0.25),
             "np_int": np.int64(3), "vec": torch.tensor([1.0, 2.0]), "text": "abc", "flag": True, "n": 7,
             "t_nan": torch.tensor(float("nan")), "step": 99}
    for step in range(3):
        log.log_step(step, {**weird, "loss": float(step)})
    log.close()
    log.close()  # idempotent
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # a scalar named "step" never overrides the step
    assert [r["loss"] for r in rows] == [0.0, 1.0, 2.0]
    row = rows[0]
    assert isinstance(row["time"], float)
    assert (row["nan"], row["inf"], row["vec"], row["text"], row["t_nan"]) == (None, None, None, None, None)
    assert (row["t0"], row["np"], row["np_int"], row["flag"], row["n"]) == (0.5, 0.25, 3, 1, 7)
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()  # strict JSON


def test_resume_drops_lines_from_start_step(tmp_path):
    log = RunLogger(tmp_path, total_steps=10, tensorboard=False, progress_bar=False)
    for step in range(5):
        log.log_step(step, {"x": step})
    log.log_samples(1, [_s(Task.MASK_PRED, "a", 1, 1.0)], k=1)
    log.log_samples(4, [_s(Task.MASK_PRED, "a", 1, 1.0)], k=1)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "ti')  # kill -9 mid-line

    log = RunLogger(tmp_path, total_steps=10, start_step=3, tensorboard=False, progress_bar=False)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000001.jsonl"]
    assert not list(tmp_path.glob("*.tmp"))
    for step in (3, 4):
        log.log_step(step, {"x": 10 * step})
    log.close()
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in rows] == [(0, 0), (1, 1), (2, 2), (3, 30), (4, 40)]


def test_fresh_start_truncates_old_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "x": 1}\n')
    RunLogger(tmp_path, total_steps=1, tensorboard=False, progress_bar=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    log = RunLogger(out, total_steps=5, enabled=False)
    log.log_step(0, {"x": 1.0}, {"h": [1.0]})
    log.log_samples(0, _step_samples(), k=2)
    log.info("hello")
    log.close()
    assert not out.exists()
    assert capsys.readouterr() == ("", "")


# ----------------------------------------------------------------------------- samples, console
def test_log_samples_round_robin_and_slim_metadata(tmp_path):
    samples = _step_samples() + [_s(Task.MASK_PRED, "g/mask1", 1, math.nan)]
    log = RunLogger(tmp_path, total_steps=5, tensorboard=False, progress_bar=False)
    log.log_samples(12, samples, k=2)
    log.close()
    rows = _lines(tmp_path / "samples" / "step_0000012.jsonl")
    assert [(r["task"], r["group_id"], r["reward"]) for r in rows] == [
        ("mask_gen", "g", 0.75), ("mask_gen", "g", 0.0),
        ("mask_pred", "g/mask0", 1.0), ("mask_pred", "g/mask1", None),  # one per group first; NaN -> null
    ]
    assert rows[0]["metadata"] == {"mask_valid": True, "span": "New York City"}  # "paragraph" dropped
    assert rows[1]["status"] == "truncated" and rows[1]["finish_reason"] == "length"
    assert rows[0]["response_tokens"] == 4


def test_progress_bar_eta_from_steady_rate(tmp_path, monkeypatch, capsys):
    clock = iter([0.0, 100.0, 110.0, 120.0])  # created; step 0 after a 100 s warm-up; then 10 s per step
    monkeypatch.setattr(log_console, "monotonic", lambda: next(clock))
    log = RunLogger(tmp_path, total_steps=10, tensorboard=False)
    for step in range(3):
        log.log_step(step, {"reward/mask_pred": 0.5, "other": 1.0})
    log.info("checkpoint saved")
    log.close()
    captured = capsys.readouterr()
    assert "checkpoint saved" in captured.out
    assert "3/10" in captured.err
    assert "eta 01:10, 10s/step" in captured.err  # 7 steps left at 10 s, warm-up excluded
    assert "reward/mask_pred=0.5" in captured.err and "other" not in captured.err


def test_progress_bar_counts_completed_steps_as_the_trainer_numbers_them(tmp_path, capsys):
    """The trainer logs step k after k completed steps (1-based) and the initial eval at step 0: a fresh 3-step
    run must end at 3/3 (it showed 1/3 before any step and ended at 4/?), a resumed one start from its count."""
    log = RunLogger(tmp_path, total_steps=3, start_step=1, steps_done=0, tensorboard=False)
    log.log_step(0, {"eval/x": 0.0})  # initial-weights eval: not a step
    assert log._bar.n == 0
    for step in (1, 2, 3):
        log.log_step(step, {})
        assert log._bar.n == step
    log.close()
    err = capsys.readouterr().err
    assert "0/3" in err and "3/3" in err and "4/" not in err

    resumed = RunLogger(tmp_path, total_steps=3, start_step=3, steps_done=2, tensorboard=False)
    assert resumed._bar.n == 2
    resumed.log_step(3, {})
    assert resumed._bar.n == 3
    resumed.close()


# ----------------------------------------------------------------------------- TensorBoard
def _events(tmp_path):
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_histograms_text(tmp_path):
    samples = _step_samples()
    log = RunLogger(tmp_path, total_steps=2, progress_bar=False)
    for step in range(2):
        log.log_step(step, {**sample_scalars(samples), "grad_norm": torch.tensor(1.5), "bad": math.nan},
                     {**sample_histograms(samples), "hist/empty": []})
    log.log_samples(1, samples, k=1)
    log.close()
    acc = _events(tmp_path)
    tags = acc.Tags()
    assert {"reward/mask_gen", "acc/mask_pred", "mask/valid_rate", "grad_norm"} <= set(tags["scalars"])
    assert "bad" not in tags["scalars"]  # non-finite values are not plotted
    assert [(e.step, e.value) for e in acc.Scalars("grad_norm")] == [(0, 1.5), (1, 1.5)]
    assert acc.Scalars("reward/mask_pred")[0].value == pytest.approx(0.5)
    assert {"hist/reward_mask_gen", "hist/length_mask_pred"} <= set(tags["histograms"])
    assert "hist/empty" not in tags["histograms"]
    assert acc.Histograms("hist/reward_mask_gen")[0].histogram_value.num == 3
    assert any(tag.startswith("samples/mask_pred") for tag in tags["tensors"])


def test_tensorboard_resume_purges_killed_steps(tmp_path):
    log = RunLogger(tmp_path, total_steps=5, progress_bar=False)
    for step in range(5):
        log.log_step(step, {"x": step})
    log.close()
    log = RunLogger(tmp_path, total_steps=5, start_step=3, progress_bar=False)
    for step in (3, 4):
        log.log_step(step, {"x": 10 * step})
    log.close()
    assert [(e.step, e.value) for e in _events(tmp_path).Scalars("x")] == [(0, 0), (1, 1), (2, 2), (3, 30), (4, 40)]


# ----------------------------------------------------------------------------- the console for people
def test_step_line_names_what_a_person_watches():
    line = log_console.step_line(3, 100, {"reward/mask_gen": 0.4123, "reward/mask_pred": 0.27, "acc/mask_pred": 0.27,
                                          "mask/valid_rate": 0.625, "count/mask_gen": 8.0, "train/tokens": 1234.0,
                                          "eval/wiki_span/accuracy": 1 / 3, "time/step": 12.34, "rollout/x": 5.0,
                                          "reward/mask_pred_bonus/extra": 1.0, "loss": None})
    assert line == ("step 3/100 | reward mask_gen 0.412 mask_pred 0.270 | acc 0.270 | masks valid 5/8 | "
                    "trained 1234 tok | eval wiki_span 0.333 | 12.3s")
    assert "\n" not in line
    assert log_console.step_line(0, 5, {"eval/wiki_span/accuracy": 0.5}, initial=True) == (
        "initial weights | eval wiki_span 0.500")
    assert log_console.step_line(1, 2, {"reward/random_span": 0.0, "time/step": 1.0}) == (
        "step 1/2 | reward random_span 0.000 | 1.0s")
    # entropy per task always, truncation only where some answer was cut
    assert log_console.step_line(2, 2, {"groups/random_span": 8.0, "groups_mixed/random_span": 3.0,
                                        "entropy/random_span": 1.234, "trunc_rate/random_span": 0.125,
                                        "trunc_rate/mask_gen": 0.0}) == (
        "step 2/2 | mixed groups 3/8 | entropy random_span 1.23 | truncated random_span 12%")


def test_run_logger_prints_one_line_per_step(tmp_path, capsys):
    log = RunLogger(tmp_path, total_steps=2, start_step=1, steps_done=0, tensorboard=False, progress_bar=False)
    log.log_step(0, {"eval/wiki_span/accuracy": 0.5})  # the initial-weights eval
    for step in (1, 2):
        log.log_step(step, {"reward/mask_gen": 0.5, "time/step": 2.0})
    log.close()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["start    step 1 of 2 (no checkpoint to resume from)",
                                "initial weights | eval wiki_span 0.500", "step 1/2 | reward mask_gen 0.500 | 2.0s",
                                "step 2/2 | reward mask_gen 0.500 | 2.0s"]
    assert err == ""
    RunLogger(tmp_path, total_steps=4, start_step=3, steps_done=2, tensorboard=False, progress_bar=False).close()
    assert capsys.readouterr().out == "resume   after step 2 of 4 (the last checkpoint)\n"
    RunLogger(tmp_path, total_steps=4, start_step=3, steps_done=2, tensorboard=False, progress_bar=False,
              resumed_from=tmp_path / "checkpoints" / "iter_0000002").close()
    assert capsys.readouterr().out == f"resume   after step 2 of 4 (resumed from {tmp_path}/checkpoints/iter_0000002)\n"


_CHATTY = """
import logging, sys, warnings
from megatron_pz.logs import configure_console, say
path = configure_console(sys.argv[1], int(sys.argv[2]))
warnings.warn("Apex is not installed. Falling back to Torch Norm")
logging.getLogger("megatron.core.optimizer").info("Setting up optimizer with config OptimizerConfig(lr=1e-06)")
logging.getLogger("megatron.core.optimizer").warning("a library warning")
logging.getLogger("megatron_pz.rollout.launcher").info("starting embedded server")
logging.getLogger("megatron_pz.trainer.setup").warning("will checkpoint after the current step")
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.modeling_utils").warning("some transformers warning")
import torch.utils.cpp_extension  # torch's loggers print through the "torch" logger's own stderr handler
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
if int(sys.argv[2]) == 0:
    say("model  tiny")
try:
    raise RuntimeError("boom")
except RuntimeError:
    logging.getLogger("megatron.core").exception("a library error\\nwith a second line")
print(path)
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_configure_console_keeps_chatter_in_the_log_file(tmp_path, rank):
    """A subprocess: pytest's own warning and log capture would hide what the real entry point does."""
    p = subprocess.run([sys.executable, "-c", _CHATTY, str(tmp_path / "run"), str(rank)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    log_path = tmp_path / "run" / ("train.log" if rank == 0 else "train.rank1.log")
    assert p.stdout.splitlines() == (["model  tiny"] if rank == 0 else []) + [str(log_path)]
    log = log_path.read_text()
    for chatter in ("Apex is not installed", "OptimizerConfig(lr=1e-06)", "a library warning",
                    "starting embedded server", "some transformers warning", "No CUDA runtime", "Traceback", "RuntimeError: boom"):
        assert chatter in log, chatter
    err = p.stderr.splitlines()
    ours = ["megatron-pz: warning: will checkpoint after the current step"] if rank == 0 else []
    assert err == ours + [f"megatron-pz: error: a library error (details in {log_path})"]
    if rank == 0:
        assert "model  tiny" in log  # the console's lines are in the file too
