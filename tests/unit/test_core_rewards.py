"""Rewards: exact match [PZ Eq. 8], generator reward [PZ Eq. 9] incl. ablation, RPT prefix reward, registry."""
import pytest

from megatron_pz.data.corpus import Paragraph
from megatron_pz.data.prompts import PromptConfig
from megatron_pz.data.spans import SpanConfig
from megatron_pz.data.tasks import generation_samples, prediction_samples
from megatron_pz.errors import ConfigError
from megatron_pz.rewards import registry, rpt, span
from megatron_pz.rewards.span import (
    RewardConfig,
    assign_generator_rewards,
    exact_match,
    exact_match_lenient,
    generator_reward,
    score_samples,
)
from megatron_pz.types import Sample, Status, Task


@pytest.mark.parametrize(
    "response, target, strict, lenient",
    [
        ("so it is \\boxed{stakes}", "stakes", 1.0, 1.0),
        ("\\boxed{ stakes\n}", "stakes", 1.0, 1.0),  # surrounding whitespace is stripped in both
        ("\\boxed{stakes}", "  stakes ", 1.0, 1.0),
        ("\\boxed{Stakes}", "stakes", 0.0, 1.0),  # case
        ("\\boxed{stakes.}", "stakes", 0.0, 1.0),  # trailing punctuation
        ("\\boxed{stakes  events}", "stakes events", 0.0, 1.0),  # inner whitespace
        ("\\boxed{The  Adios Pace?!}", "the Adios pace", 0.0, 1.0),
        ("\\boxed{stake}", "stakes", 0.0, 0.0),
        ("\\boxed{x} then \\boxed{stakes}", "stakes", 1.0, 1.0),  # last box counts
        ("\\boxed{stakes} then \\boxed{x}", "stakes", 0.0, 0.0),
        ("the answer is stakes", "stakes", 0.0, 0.0),  # no box
        ("\\boxed{stakes", "stakes", 0.0, 0.0),  # unterminated
        ("\\boxed{}", "", 1.0, 1.0),
    ],
)
def test_exact_match(response, target, strict, lenient):
    assert exact_match(response, target) == strict
    assert exact_match_lenient(response, target) == lenient


def test_generator_reward_eq9_hand_values():
    # [PZ Eq. 9]: 1 - acc, and 0 when acc = 0
    assert generator_reward(0.0) == 0.0
    assert generator_reward(1 / 8) == 0.875
    assert generator_reward(0.5) == 0.5
    assert generator_reward(7 / 8) == 0.125
    assert generator_reward(1.0) == 0.0
    assert generator_reward(None) == 0.0  # invalid mask
    # zero-mask-accuracy ablation: the override is off, so acc 0 earns the maximum 1
    assert generator_reward(0.0, zero_acc_rule=False) == 1.0
    assert generator_reward(1 / 8, zero_acc_rule=False) == 0.875
    assert generator_reward(None, invalid_mask_reward=-1.0) == -1.0


# ---------------------------------------------------------------- registry
def test_registry_names_and_paths():
    assert registry.get_reward("exact_match") is span.exact_match
    assert registry.get_reward("exact_match_lenient") is span.exact_match_lenient
    assert registry.get_reward("rpt_prefix") is rpt.rpt_prefix
    assert registry.get_reward("megatron_pz.rewards.span:exact_match") is span.exact_match
    assert registry.get_reward("megatron_pz.rewards.span.exact_match") is span.exact_match
    assert {"exact_match", "exact_match_lenient", "rpt_prefix"} <= set(registry.available_rewards())


def test_plugin_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def prefix_ok(response, target, **info):\n    return float(response.startswith(target))\n"
        "class Holder:\n    @staticmethod\n    def always(response, target, **info):\n        return 0.5\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = registry.get_reward("my_rewards:prefix_ok")
    assert fn("abc", "ab") == 1.0 and fn("abc", "b") == 0.0
    assert registry.get_reward("my_rewards:Holder.always")("x", "y") == 0.5
    with pytest.raises(ConfigError, match="is not callable"):
        registry.get_reward("my_rewards:NOT_CALLABLE")
    cfg = RewardConfig(pred_reward="my_rewards.prefix_ok")
    s = Sample(Task.MASK_PRED, "g", response_text="abc", status=Status.COMPLETED, metadata={"target": "ab"})
    score_samples([s], cfg)
    assert s.reward == 1.0


@pytest.mark.parametrize(
    "name, message",
    [("nope", "unknown reward 'nope'"), ("no_such_module_xyz:fn", "cannot import module"),
     ("megatron_pz.rewards.span:missing", "has no attribute"), ("", "non-empty"), (":fn", "expected 'pkg.module")],
)
def test_registry_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        registry.get_reward(name)


def test_register_reward_and_config_validation(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", {})  # keep the global registry clean for other tests
    registry.register_reward("test_constant_one", lambda response, target, **info: 1.0)
    assert RewardConfig(pred_reward="test_constant_one").pred_reward == "test_constant_one"
    with pytest.raises(ConfigError, match="not callable"):
        registry.register_reward("x", 3)
    with pytest.raises(ConfigError, match="RewardConfig.pred_reward: unknown reward 'bogus'"):
        RewardConfig(pred_reward="bogus")
    with pytest.raises(ConfigError, match="RewardConfig.next_token_reward"):
        RewardConfig(next_token_reward="bogus")
    with pytest.raises(ConfigError, match="RewardConfig.zero_acc_rule"):
        RewardConfig(zero_acc_rule="yes")
    with pytest.raises(ConfigError, match="RewardConfig.invalid_mask_reward"):
        RewardConfig(invalid_mask_reward="0")


# ---------------------------------------------------------------- the full reward stage on one paragraph
PARAGRAPH = Paragraph("enwiki-1-000", "Ralph Hanover",
                      "In addition to his 1983 Triple Crown wins, Ralph Hanover won seventeen additional stakes "
                      "events, including the very important Adios and Meadowlands Pace.")


def _rollouts(group, n_correct, n=8, aborted=0):
    target = group[0].metadata["target"]
    for i, s in enumerate(group):
        s.status = Status.ABORTED if i >= n - aborted else Status.COMPLETED
        s.response_text = f"\\boxed{{{target if i < n_correct else 'wrong'}}}"


def _stage(cfg):
    gens = generation_samples(PARAGRAPH, "step0/p", 6, PromptConfig())
    outputs = ["\\mask{stakes}", "\\mask{Ralph Hanover}", "\\mask{1983}", "\\mask{dog}", "no mask at all",
               "\\mask{Adios}"]
    preds_by_gen = []
    for g, out in zip(gens, outputs, strict=True):
        g.response_text, g.status = out, Status.COMPLETED
        preds_by_gen.append(prediction_samples(g, 8, SpanConfig(), PromptConfig())[1])
    _rollouts(preds_by_gen[0], 1, aborted=0)  # acc 1/8
    preds_by_gen[0].append(Sample(Task.MASK_PRED, preds_by_gen[0][0].group_id, status=Status.ABORTED,
                                  metadata={"target": "stakes"}))  # an aborted extra rollout is ignored
    _rollouts(preds_by_gen[1], 0)  # acc 0
    _rollouts(preds_by_gen[2], 8)  # acc 1
    _rollouts(preds_by_gen[5], 8, aborted=8)  # every predictor rollout failed: accuracy unknown
    preds = [s for group in preds_by_gen for s in group]
    score_samples(preds, cfg)
    return gens, preds, assign_generator_rewards(gens, preds, cfg)


def test_reward_stage_hand_computed():
    gens, preds, metrics = _stage(RewardConfig())
    assert [g.reward for g in gens] == [0.875, 0.0, 0.0, 0.0, 0.0, None]
    assert [g.metadata["mask_reason"] for g in gens] == ["valid", "valid", "valid", "not_found", "missing", "valid"]
    assert sum(s.reward for s in preds if s.reward is not None) == 1 + 0 + 8
    assert [s.reward for s in preds if s.status is Status.ABORTED] == [None] * 9
    assert metrics["mask_valid_frac"] == pytest.approx(4 / 6)
    assert metrics["mask_reason/not_found"] == pytest.approx(1 / 6)
    assert metrics["mask_reason/missing"] == pytest.approx(1 / 6)
    assert metrics["pred_acc_mean"] == pytest.approx((1 / 8 + 0 + 1) / 3)
    assert metrics["pred_acc_zero_frac"] == pytest.approx(1 / 3)
    assert metrics["pred_acc_one_frac"] == pytest.approx(1 / 3)


def test_reward_stage_zero_accuracy_ablation():
    gens, _, _ = _stage(RewardConfig(zero_acc_rule=False))
    assert [g.reward for g in gens] == [0.875, 1.0, 0.0, 0.0, 0.0, None]


def test_repeat_penalty_divides_by_the_batch_count_of_the_span():
    from megatron_pz.rewards.span import repeat_counts

    assert repeat_counts(["and", " And", "of", "and "]) == [3, 3, 1, 3]  # casefolded, stripped
    assert repeat_counts([]) == []
    gens = generation_samples(PARAGRAPH, "step0/p", 5, PromptConfig())
    outputs = ["\\mask{stakes}", "\\mask{ stakes}", "\\mask{stakes}", "\\mask{Adios}", "\\mask{dog}"]
    groups = []
    for g, out in zip(gens, outputs, strict=True):
        g.response_text, g.status = out, Status.COMPLETED
        groups.append(prediction_samples(g, 8, SpanConfig(), PromptConfig())[1])
    for group, k in zip(groups, (2, 4, 8, 1, 0)):  # accuracies 1/4, 1/2, 1 and 1/8; "dog" is invalid
        if group:
            _rollouts(group, k)
    preds = [s for group in groups for s in group]
    score_samples(preds, RewardConfig())
    assign_generator_rewards(gens, preds, RewardConfig(gen_repeat_penalty=True))
    # "stakes" named 3 times: (1 - 1/4) / 3, (1 - 1/2) / 3, 0 (acc 1); "Adios" once; "dog" invalid
    assert [g.reward for g in gens] == pytest.approx([0.75 / 3, 0.5 / 3, 0.0, 0.875, 0.0])
    assign_generator_rewards(gens, preds, RewardConfig())  # off: Eq. 9 as is
    assert [g.reward for g in gens] == pytest.approx([0.75, 0.5, 0.0, 0.875, 0.0])
    with pytest.raises(ConfigError, match="RewardConfig.gen_repeat_penalty"):
        RewardConfig(gen_repeat_penalty=1)


def test_unparsed_generator_sample_is_an_error():
    g = generation_samples(PARAGRAPH, "g", 1, PromptConfig())[0]
    g.status = Status.COMPLETED
    with pytest.raises(ValueError, match="never parsed"):
        assign_generator_rewards([g], [], RewardConfig())


# ---------------------------------------------------------------- RPT prefix reward [RPT Eq. 3]
@pytest.mark.parametrize(
    "prediction, expected",
    [(" Paris", 1.0), (" Paris is", 1.0), (" Par", 0.0), (" Paris was", 0.0), ("Paris", 0.0), ("", 0.0),
     (" Paris is the", 0.0)],  # longer than the stored continuation
)
def test_prefix_match(prediction, expected):
    # target " Paris is" tokenised as [" Paris", " is"] -> cumulative byte ends [6, 9]
    assert rpt.prefix_match(prediction, " Paris is", [6, 9]) == expected


def test_prefix_match_counts_bytes_not_characters():
    # "é" is 2 UTF-8 bytes: tokens ["é", " x"] end at bytes [2, 4]
    assert rpt.prefix_match("é", "é x", [2, 4]) == 1.0
    assert rpt.prefix_match("é x", "é x", [2, 4]) == 1.0
    assert rpt.prefix_match("é", "é x", [1, 4]) == 0.0


def test_rpt_prefix_reward_extraction():
    assert rpt.rpt_prefix("<think>\\boxed{ Rome}</think> \\boxed{ Paris}", " Paris is", gt_token_byte_ends=[6, 9]) == 1
    assert rpt.rpt_prefix("\\boxed{Paris}", " Paris is", gt_token_byte_ends=[6, 9]) == 0  # no stripping
    assert rpt.rpt_prefix("no box", " Paris is", gt_token_byte_ends=[6, 9]) == 0
    s = Sample(Task.NEXT_TOKEN, "g", response_text="\\boxed{ Paris}", status=Status.COMPLETED,
               metadata={"target": " Paris is", "gt_token_byte_ends": [6, 9], "position": 4})
    score_samples([s], RewardConfig())
    assert s.reward == 1.0


# ---------------------------------------------------------------- continuation_match (prompt.pred_restate)
from megatron_pz.rewards.span import continuation_match  # noqa: E402


@pytest.mark.parametrize("response,target,want", [
    (" Paris, the capital", "Paris", 1.0),     # the first word, punctuation after it is not part of it
    ("Paris", "Paris", 1.0),
    (" New York is big", "New York", 1.0),     # k = 2 words
    (" New  York", "New York", 0.0),           # the text between the words must match too
    (" Pari", "Paris", 0.0),
    (" Paris-Nord", "Paris", 0.0),             # one hyphenated word is not "Paris"
    (" paris", "Paris", 0.0),                  # strict: case matters
    (" (Paris)", "Paris", 0.0),                # something before the first word
    ("", "Paris", 0.0),
    ("   ", "Paris", 0.0),
    (" Paris", "", 0.0),                       # a target without words scores 0
    (" Paris", " Paris ", 1.0),                # the target is stripped
    (" it's here", "it's", 1.0),               # an apostrophe joins a word, as in the span rules
])
def test_continuation_match_by_hand(response, target, want):
    assert continuation_match(response, target) == want


def test_continuation_match_survives_anything():
    for junk in ["\x00" * 10, "}" * 1000, "\\boxed{Paris}", "💥" * 50, "a" * 100_000]:
        assert continuation_match(junk, "Paris") == 0.0


def test_restate_needs_the_continuation_reward():
    from megatron_pz.config import RunConfig
    from megatron_pz.data.prompts import PromptConfig
    from megatron_pz.errors import ConfigError
    from megatron_pz.rewards.span import RewardConfig

    with pytest.raises(ConfigError, match="reward.pred_reward=continuation_match"):
        RunConfig(prompt=PromptConfig(pred_restate=True))
    RunConfig(prompt=PromptConfig(pred_restate=True), reward=RewardConfig(pred_reward="continuation_match"))
