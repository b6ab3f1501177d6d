"""The objective registry: one ``Objective`` record per ``train.objective``, read by config, planner and trainer."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from megatron_pz.config import SPAN_OBJECTIVES, RunConfig, TrainConfig, load_config
from megatron_pz.data import tasks
from megatron_pz.data.objectives import OBJECTIVES, Objective, objective_of
from megatron_pz.errors import ConfigError
from megatron_pz.plan.archs import samples_per_dp_rank


def test_every_objective_has_exactly_one_collector():
    from megatron_pz.trainer.collect import COLLECTORS

    assert set(COLLECTORS) == set(OBJECTIVES)
    assert all(callable(COLLECTORS[name]) for name in OBJECTIVES)


def test_records_are_frozen_named_by_their_key_and_name_train_fields():
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, o in OBJECTIVES.items():
        assert isinstance(o, Objective) and o.name == name and o.label
        assert set(o.group_sizes) <= train_fields
        with pytest.raises(dataclasses.FrozenInstanceError):
            o.supervised = True  # type: ignore[misc]
    assert tasks.OBJECTIVES is OBJECTIVES  # the old import path names the same registry


def test_attributes_decide_what_the_name_comparisons_decided():
    assert SPAN_OBJECTIVES == ("pretrainzero", "random_span", "sft_span")
    assert [n for n, o in OBJECTIVES.items() if o.supervised] == ["sft_span"]
    assert [n for n, o in OBJECTIVES.items() if not o.shared_prompts] == ["sft_span"]
    assert [n for n, o in OBJECTIVES.items() if o.generator] == ["pretrainzero"]
    assert {n: o.group_sizes for n, o in OBJECTIVES.items()} == {
        "pretrainzero": ("masks_per_paragraph", "predictions_per_mask"), "random_span": ("predictions_per_mask",),
        "rpt": ("predictions_per_mask",), "sft_span": ()}
    assert load_config(None, ["train.objective=rpt"]).train.objective_spec is OBJECTIVES["rpt"]
    assert objective_of(SimpleNamespace(objective="random_span")) is OBJECTIVES["random_span"]
    with pytest.raises(ConfigError, match="train.objective must be"):
        objective_of(SimpleNamespace(objective="next_token"))


@pytest.mark.parametrize("objective, batch", [
    ("pretrainzero", "8 masks x 8 predictions"), ("random_span", "8 spans x 8 predictions"),
    ("rpt", "8 next-token positions x 8 predictions"), ("sft_span", "8 supervised spans")])
def test_console_wording_per_objective(objective, batch):
    lines = load_config(None, [f"train.objective={objective}"]).describe(1)
    assert lines[-1] == f"run      {objective}, 2000 steps of 32 paragraphs x {batch}"


def test_sft_span_shares_no_prompt_and_replays_no_routing():
    cfg = load_config(None, ["train.objective=sft_span"])
    assert not cfg.shared_prompt_on(transformer_engine=False)
    assert RunConfig().shared_prompt_on(transformer_engine=False)
    with pytest.raises(ConfigError, match="train.objective=sft_span trains on teacher-forced text"):
        load_config(None, ["train.objective=sft_span", "model.moe_routing_replay=true"])


def test_samples_per_rank_count_the_generator_only_for_pretrainzero():
    pz = load_config(None)
    rs = load_config(None, ["train.objective=random_span"])
    assert samples_per_dp_rank(pz, 2) == 16 * (8 * 8 + 8)
    assert samples_per_dp_rank(rs, 2) == 16 * 8 * 8
