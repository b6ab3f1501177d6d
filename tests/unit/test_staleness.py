"""Staleness of samples against the trainer's weight version (algo/staleness.py), and the rollout batch in flight
(trainer/overlap.py): JSON round trip, one batch at a time, and the checkpoint's view of it."""
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_pz.algo.staleness import stalest, staleness, staleness_metrics
from megatron_pz.data.shards import Paragraph
from megatron_pz.errors import CheckpointError, RolloutError
from megatron_pz.trainer import overlap
from megatron_pz.parallel import DataLayout
from megatron_pz.trainer.overlap import Batch, sample_from_json, sample_to_json
from megatron_pz.trainer.rollout_source import RolloutSource
from megatron_pz.types import Sample, Status, Task


def sample(version, **kw):
    return Sample(task=Task.RANDOM_SPAN, group_id="g", weight_version=version, **kw)


def test_staleness_counts_versions_between_generator_and_trainer():
    assert staleness(sample(3), 4) == 1
    assert staleness(sample(4), 4) == 0
    assert staleness(sample(-1), 4) is None  # teacher-forced or unknown: no generator version
    assert stalest([sample(2), sample(4), sample(-1)], 4) == 2
    assert stalest([sample(-1)], 4) == 0


def test_staleness_metrics_by_hand():
    # versions 5, 5, 4, 3 and one unknown, trainer at 5: staleness 0, 0, 1, 2 -> mean 3/4, max 2
    m = staleness_metrics([sample(5), sample(5), sample(4), sample(3), sample(-1)], 5)
    assert m == {"rollout/staleness_mean": 0.75, "rollout/staleness_max": 2.0, "rollout/staleness_0": 2.0,
                 "rollout/staleness_1": 1.0, "rollout/staleness_2": 1.0}
    assert staleness_metrics([sample(-1)], 5) == {}


def test_sample_json_round_trip_is_exact():
    s = Sample(task=Task.MASK_PRED, group_id="s1/r0/p0/m1", prompt_text="Text: x", prompt_ids=[1, 2, 3],
               response_text="a", response_ids=[7, 8], rollout_logprobs=[-0.1234567890123, -2.5e-9],
               status=Status.TRUNCATED, finish_reason="length", weight_version=3, reward=1.0, advantage=-0.7071067811865476,
               routed_experts=np.array([[1, 2], [3, 4]], dtype=np.int16), metadata={"target": "x", "span": [0, 1]})
    back = sample_from_json(__import__("json").loads(__import__("json").dumps(sample_to_json(s))))
    assert back.routed_experts.dtype == np.int16 and np.array_equal(back.routed_experts, s.routed_experts)
    back.routed_experts, s.routed_experts = None, None
    assert back == s


def source(collect):
    """A data owner's rollout source on a corpus of 100 paragraphs, 2 a step, overlap on; ``collect`` stands in
    for generation (no engine)."""
    cfg = SimpleNamespace(train=SimpleNamespace(paragraphs_per_step=2, steps=10),
                          rollout=SimpleNamespace(max_staleness=1))
    corpus = iter([Paragraph(str(i), "t", f"text {i}") for i in range(100)])
    src = RolloutSource(cfg, DataLayout(dp_rank=0, dp_size=1, is_data_owner=True), tokenizer=None,
                        chat_template=None, weights=SimpleNamespace(version=1), corpus=corpus)
    src._collect = collect
    return src, corpus


def test_one_batch_in_flight_read_in_order_and_taken_for_its_step():
    release = threading.Event()
    seen = []

    def fake_collect(batch):
        release.wait(10)
        seen.append(batch.step)
        batch.samples, batch.metrics = [sample(batch.step)], {"rollout/x": 1.0}

    src, corpus = source(fake_collect)
    p = src.prefetcher
    src.prefetch(1)
    assert p.in_flight_step == 1
    assert next(corpus).id == "2"  # the prefetch read paragraphs 0 and 1 in the main thread, in order
    with pytest.raises(RuntimeError, match="already in flight"):
        p.submit(Batch(2, []), fake_collect)
    with pytest.raises(RuntimeError, match="wait"):
        p.state_dict()  # a batch being generated cannot be saved
    release.set()
    done = p.wait()
    assert done.step == 1 and seen == [1]
    state = p.state_dict()
    assert [q["id"] for q in state["paragraphs"]] == ["0", "1"] and state["samples"][0]["weight_version"] == 1
    with pytest.raises(CheckpointError, match="step 2, the run is at step 3"):
        p.take(2)
    p.load_state_dict(state)
    b = p.take(1)
    assert b.samples == [sample(1)] and b.metrics == {"rollout/x": 1.0} and p.take(2) is None
    src.prefetch(10)  # after the last step: nothing
    assert p.in_flight_step is None
    p.close()


def test_a_failed_batch_is_saved_as_its_paragraphs():
    src, _ = source(lambda batch: RolloutError("server gone"))
    p = src.prefetcher
    src.prefetch(0)
    b = p.wait()
    assert isinstance(b.error, RolloutError)
    state = p.state_dict()
    assert state["samples"] is None and len(state["paragraphs"]) == 2
    p.load_state_dict(state)
    assert p.take(0).samples is None  # collected again by the trainer
    with pytest.raises(CheckpointError, match="unreadable"):
        p.load_state_dict({"step": 0, "paragraphs": [{"id": "0"}], "samples": None})
    p.close()


def test_a_batch_over_the_bound_is_collected_again_and_counted():
    src, _ = source(lambda batch: None)
    src.prefetcher.load_state_dict({"step": 3, "paragraphs": [{"id": "0", "title": "t", "text": "x"}],
                                    "samples": [overlap.sample_to_json(sample(-1)), overlap.sample_to_json(sample(0))],
                                    "metrics": {}})
    src.weights.version = 2  # the samples of version 0 are 2 versions old, over max_staleness 1
    b = src._take(3)
    assert b.samples is None and src.stale_regenerated == 2 and [q.id for q in b.paragraphs] == ["0"]


def test_batch_reset_forgets_samples_keeps_paragraphs():
    b = Batch(0, [Paragraph("0", "t", "x")], [sample(0)], {"rollout/x": 1.0}, RolloutError("e"))
    b.reset()
    assert (b.samples, b.metrics, b.error) == (None, {}, None) and b.paragraphs
