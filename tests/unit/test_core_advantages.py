"""GRPO group advantages [PZ Eq. 10] and the DAPO zero-variance filter, with hand-computed numbers."""
import math

import pytest

from megatron_pz.algo.advantages import AdvantageConfig, compute_advantages, group_advantages
from megatron_pz.errors import ConfigError
from megatron_pz.types import Sample, Status, Task


def test_predictor_group_population_std():
    # rewards [1,0,0,0]: mean 1/4, population std sqrt(3/16) = 0.4330127 -> A = [sqrt(3), -1/sqrt(3) x3]
    adv = group_advantages([1, 0, 0, 0], AdvantageConfig(eps=1e-12))
    assert adv == pytest.approx([math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)], rel=1e-9)


def test_sample_std_and_eps():
    # ddof=1: std = sqrt(0.75 / 3) = 0.5 -> [1.5, -0.5, -0.5, -0.5]; eps = 0.5 halves them
    adv = group_advantages([1, 0, 0, 0], AdvantageConfig(ddof=1, eps=1e-12))
    assert adv == pytest.approx([1.5, -0.5, -0.5, -0.5])
    adv = group_advantages([1, 0, 0, 0], AdvantageConfig(ddof=1, eps=0.5))
    assert adv == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_no_std_normalisation():
    assert group_advantages([1, 0, 0, 0], AdvantageConfig(std_normalize=False)) == [0.75, -0.25, -0.25, -0.25]


def test_generator_group_with_invalid_masks():
    # r_gen = [0.875 (acc 1/8), 0 (acc 0), 0 (invalid), 0 (invalid), 0 (acc 1)]:
    # mean 0.175, deviations [0.7, -0.175 x4], population var (0.49 + 4 * 0.030625) / 5 = 0.1225, std 0.35
    adv = group_advantages([0.875, 0.0, 0.0, 0.0, 0.0], AdvantageConfig(eps=1e-12))
    assert adv == pytest.approx([2.0, -0.5, -0.5, -0.5, -0.5])


def test_zero_variance_group_gives_zero_not_nan():
    assert group_advantages([1.0, 1.0], AdvantageConfig()) == [0.0, 0.0]
    assert group_advantages([0.3], AdvantageConfig(ddof=1)) == [0.0]
    assert group_advantages([], AdvantageConfig()) == []


def _s(group, reward, status=Status.COMPLETED):
    return Sample(Task.MASK_PRED, group, reward=reward, status=status, response_ids=[1])


def test_compute_advantages_groups_and_dapo_filter():
    samples = (
        [_s("mixed", r) for r in (1.0, 0.0, 0.0, 0.0)]
        + [_s("all_one", 1.0) for _ in range(4)]
        + [_s("all_zero", 0.0) for _ in range(4)]
        + [_s("single", 1.0)]
        + [_s("gen", 0.875), _s("gen", 0.0, Status.TRUNCATED), _s("gen", None), _s("gen", 0.5, Status.ABORTED)]
    )
    metrics = compute_advantages(samples, AdvantageConfig(eps=1e-12))
    mixed, all_one, all_zero, single, gen = samples[:4], samples[4:8], samples[8:12], samples[12], samples[13:]
    assert [s.advantage for s in mixed] == pytest.approx([math.sqrt(3)] + [-1 / math.sqrt(3)] * 3)
    assert all(s.status is Status.COMPLETED and s.trainable for s in mixed)
    for s in all_one + all_zero + [single]:
        assert s.status is Status.FILTERED and s.advantage == 0.0 and not s.trainable
    # "gen": only the two generated, scored samples form the group: [0.875, 0] -> [+1, -1]
    assert gen[0].advantage == pytest.approx(1.0) and gen[1].advantage == pytest.approx(-1.0)
    assert gen[1].status is Status.TRUNCATED and gen[1].trainable
    assert gen[2].advantage is None and gen[3].advantage is None and gen[3].status is Status.ABORTED
    assert metrics == pytest.approx({"groups": 5.0, "groups_filtered_frac": 3 / 5, "samples_kept_frac": 6 / 15})


def test_without_dapo_filter_zero_variance_groups_stay_with_zero_advantage():
    samples = [_s("all_one", 1.0) for _ in range(3)]
    compute_advantages(samples, AdvantageConfig(dapo_filter=False))
    assert all(s.status is Status.COMPLETED and s.advantage == 0.0 and s.trainable for s in samples)


@pytest.mark.parametrize("kwargs", [{"eps": -1.0}, {"ddof": 2}, {"eps": 0.0}])
def test_advantage_config_validation(kwargs):
    with pytest.raises(ConfigError, match="AdvantageConfig.eps|AdvantageConfig.ddof"):
        AdvantageConfig(**kwargs)
    assert AdvantageConfig(std_normalize=False, eps=0.0).eps == 0.0
