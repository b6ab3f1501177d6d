"""benchmarks.soak's arithmetic on hand-made samples (the slow e2e test runs the real 300-step soak)."""
import math

import pytest

from benchmarks.soak import judge, per_step, slope_per_100


def test_slope_is_a_fraction_of_the_mean_per_100_steps():
    assert slope_per_100([1, 2, 3], [100, 101, 102]) == pytest.approx(100 / 101)  # +1 a step, mean 101
    assert slope_per_100([10, 20, 30], [5, 5, 5]) == 0
    assert math.isnan(slope_per_100([4], [1.0]))


def test_each_step_gets_the_last_sample_before_its_end():
    rows = [{"step": 1, "time": 10.0, "time/step": 2.0}, {"step": 2, "time": 12.5, "time/step": 2.5}]
    samples = [{"time": t, "rss": r} for t, r in ((9.0, 1), (10.0, 2), (11.0, 3), (13.0, 4))]
    assert per_step(rows, samples) == [{"step": 1, "step_s": 2.0, "rss": 2}, {"step": 2, "step_s": 2.5, "rss": 3}]
    assert per_step(rows, [{"time": 11.0, "rss": 7}]) == [{"step": 2, "step_s": 2.5, "rss": 7}]


def steps(n, rss=lambda s: 1000, fds=lambda s: 50, kept=lambda s: 100):
    return [{"step": s, "step_s": 1.0, "rss": rss(s), "fds": fds(s), "threads": 9, "procs": 3, "kept_bytes": kept(s),
             "log_bytes": s} for s in range(1, n + 1)]


def test_a_flat_run_passes_and_each_leak_fails_its_own_criterion():
    assert all(judge(steps(60), warmup=20)["ok"].values())
    r = judge(steps(60, rss=lambda s: 1000 + 2 * s), warmup=20)  # +200 per 100 steps on a mean of 1081 (steps 21..60)
    assert r["rss_growth_per_100_steps"] == pytest.approx(200 / 1081) and not r["ok"]["rss"]
    assert [k for k, v in judge(steps(60, fds=lambda s: 50 + s // 30), warmup=20)["ok"].items() if not v] == ["fds"]
    # a descriptor that comes and goes (a save's file) is no leak
    assert judge(steps(60, fds=lambda s: 51 if s % 10 == 0 else 50), warmup=20)["ok"]["fds"]
    # checkpoints that pile up are not bounded; ones that are pruned are
    assert not judge(steps(60, kept=lambda s: 100 * (s // 10)), warmup=20)["ok"]["kept_bounded"]
    assert judge(steps(60, kept=lambda s: 300 if s % 10 == 0 else 200), warmup=20)["ok"]["kept_bounded"]


def test_too_few_steps_after_the_warmup_is_refused():
    with pytest.raises(SystemExit, match="run more steps"):
        judge(steps(22), warmup=20)


def test_a_save_worker_that_comes_and_goes_is_not_judged_as_a_leak():
    steps_ = steps(100, rss=lambda s: 1000 + (900 if s % 10 == 0 and s > 60 else 0),
                   fds=lambda s: 50 + (240 if s % 10 == 0 and s > 60 else 0))
    for s in steps_:
        s["procs"] = 5 if s["step"] % 10 == 0 else 3  # the checkpoint workers, alive only in save steps
    r = judge(steps_, warmup=20)
    assert r["usual_processes"] == 3 and r["steady_samples"] == 72
    assert r["rss_growth_per_100_steps"] == 0 and all(r["ok"].values())
