"""Held-out metrics (eval/heldout*.py): the item draw, the end-of-answer rule, the batched forwards against a direct
softmax product on the tiny policy, and the paired / cluster-bootstrap statistics on hand-computed numbers."""
import json
import math
from pathlib import Path

import pytest

from megatron_pz.data.prompts import PromptConfig
from megatron_pz.eval.heldout import (Layout, answer_text, continues_word, draw_items, end_mask, expected_reward,
                                      read_paragraphs, summarize)
from megatron_pz.eval.heldout_stats import cluster_bootstrap, compare, paired

REPO = Path(__file__).resolve().parents[2]
PARAGRAPHS = [
    "Paris is the capital and most populous city of France, with an estimated population of two million.",
    "The river Seine flows through the city. Its banks are listed as a World Heritage Site since 1991.",
    "Marble was quarried on the island for the temples of the Greek world, and shipped across the sea.",
    "In the anti-war movement of the 1960s, students organised teach-ins at many universities.",
    "The cathedral (completed in 1345) is among the finest examples of French Gothic architecture.",
    "Short one, but with words enough for a span to be drawn from it by the sampler.",
]


def write_rows(path, texts=PARAGRAPHS):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"enwiki-{100 + i // 2}-{i % 2:03d}", "title": f"A{i // 2}", "text": t}) + "\n")
    return path


# ---------------------------------------------------------------- end of the answer
def test_end_mask_on_a_hand_made_vocabulary():
    vocab = [",", "ian", " Paris", ".", "", "-", "'s", "-war", "’", "5", "_x", "\ufffd", " ", "--", ")"]
    want = [True, False, True, True, True, False, False, False, False, False, True, False, True, True, True]
    assert end_mask(vocab) == want
    # " Paris" then "," ends the word; then "ian" does not ("Parisian")
    assert not continues_word(",") and continues_word("ian")


def test_expected_reward_and_the_response_cap():
    assert expected_reward(math.log(0.5), 0.8, 1, 6) == pytest.approx(0.4)
    assert expected_reward(math.log(0.5), 0.8, 6, 6) == pytest.approx(0.5)  # cut at the cap: the word ends there
    assert expected_reward(math.log(0.5), 0.8, 7, 6) == 0.0


def test_answer_text_follows_the_paragraph():
    cont, boxed = Layout(), Layout(prompt=PromptConfig(style="chat"), reward="exact_match")
    assert answer_text(cont, "Text: The capital is", "The capital is Paris.", 15, "Paris") == " Paris"
    assert answer_text(cont, "Text: The cathedral (", "The cathedral (Paris)", 15, "Paris") == "Paris"
    assert answer_text(cont, "<|im_start|>assistant\n", "Paris is.", 0, "Paris") == "Paris"
    assert answer_text(cont, "Text: ... is.\n\nText:", "Paris is.", 0, "Paris") == " Paris"
    assert answer_text(boxed, "anything", "Paris is.", 0, "Paris") == "\\boxed{Paris}"
    with pytest.raises(Exception, match="continuation_match"):
        Layout(reward="exact_match")


def test_draw_is_seeded_nested_and_filtered(tmp_path):
    rows = read_paragraphs(write_rows(tmp_path / "p.jsonl"))
    assert [(r["article"], r["paragraph"]) for r in rows[:3]] == [("enwiki-100", 0), ("enwiki-100", 1),
                                                                  ("enwiki-101", 0)]
    words = lambda t: len(t.split())  # noqa: E731
    items, counts = draw_items(rows, Layout(), words, 10, seed=3)
    again, _ = draw_items(rows, Layout(), words, 10, seed=3)
    assert items == again and len(items) == 6 and counts["eligible"] == 6
    for it in items:
        assert it.prompt.startswith("Text: ") and it.answer.strip() == it.span
        assert it.text.replace(it.span, "[mask]", 1) != it.text and " " not in it.span
    few, _ = draw_items(rows, Layout(), words, 3, seed=3)
    assert {i.key for i in few} <= {i.key for i in items} and [i.key for i in few] == sorted(i.key for i in few)
    short, counts = draw_items(rows, Layout(), words, 10, seed=3, max_prompt_tokens=17)
    assert counts["prompt_too_long"] == 6 - len(short) > 0 and all(words(i.prompt) <= 17 for i in short)


def test_default_layout_is_the_cloze_arms():
    from megatron_pz.eval.heldout_cli import load_layout

    got, want = (x.to_dict() for x in (load_layout(str(REPO / "examples" / "smollm2_cloze_random_span.yaml")),
                                       Layout()))
    for d in (got, want):
        d["prompt"].pop("gen_response_prefix")  # the generator's: no part of the prediction prompt
    assert got == want


def test_a_run_file_without_a_response_cap_gets_the_runs_default(tmp_path):
    from megatron_pz.config import TrainConfig
    from megatron_pz.eval.heldout import DEFAULT_RESPONSE_CAP
    from megatron_pz.eval.heldout_cli import load_layout

    assert DEFAULT_RESPONSE_CAP == TrainConfig().max_response_tokens
    (tmp_path / "r.yaml").write_text("prompt:\n  style: plain\n")
    got = load_layout(str(tmp_path / "r.yaml"))
    assert got.max_new_tokens == DEFAULT_RESPONSE_CAP and got.reward == "exact_match" and not got.continuation


# ---------------------------------------------------------------- batched forwards on the tiny policy
def test_batched_scores_equal_a_direct_softmax_product(tiny_policy, tmp_path, one_thread):
    import torch

    from megatron_pz.engine.model import load_model
    from megatron_pz.eval.heldout_cli import score
    from megatron_pz.eval.heldout_score import token_pieces

    lm = load_model(tiny_policy)
    tok = lm.tokenizer
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    items, _ = draw_items(read_paragraphs(write_rows(tmp_path / "p.jsonl")), Layout(), lambda t: len(enc(t)), 6)
    records = score(lm, tok, items, Layout(), batch_size=4)  # prompts of several lengths: left padding in use
    end = torch.tensor(end_mask(token_pieces(tok, lm.model.config.vocab_size)))
    with torch.no_grad():
        for it, rec in list(zip(items, records))[:3]:
            p_ids, a_ids = enc(it.prompt), enc(it.answer)
            probs = lm.model(torch.tensor([p_ids + a_ids])).logits[0].float().softmax(-1)
            want = math.prod(probs[len(p_ids) - 1 + j, a].item() for j, a in enumerate(a_ids))
            want *= probs[len(p_ids) + len(a_ids) - 1][end].sum().item()
            assert rec["p"] == pytest.approx(want, rel=1e-4) and rec["log_p"] == pytest.approx(math.log(want), abs=1e-4)
            greedy = lm.model.generate(torch.tensor([p_ids]), max_new_tokens=6, do_sample=False)[0, len(p_ids):]
            assert rec["greedy"] == tok.decode(greedy, skip_special_tokens=True)
            t_ids = enc(it.text)
            logp = lm.model(torch.tensor([t_ids])).logits[0].float().log_softmax(-1)
            nll = -sum(logp[j, t_ids[j + 1]].item() for j in range(len(t_ids) - 1))
            assert rec["nll"] == pytest.approx(nll, rel=1e-4) and rec["tokens"] == len(t_ids) - 1
    s = summarize(records)
    assert s["n"] == 6 and s["nll_per_token"] == pytest.approx(sum(r["nll"] for r in records) / s["tokens"])


# ---------------------------------------------------------------- statistics
def rec(key, article, p, nll=0.0, tokens=1, span="x"):
    return {"key": key, "article": article, "span": span, "p": p, "log_p": 0.0, "exact": 0.0, "nll": nll,
            "tokens": tokens}


def test_paired_differences_match_by_key():
    a = [rec("k1", "A", 0.1), rec("k2", "A", 0.2), rec("k3", "B", 0.5)]
    b = [rec("k3", "B", 0.4), rec("k1", "A", 0.3), rec("k2", "A", 0.2)]
    diffs, weights, arts = paired(a, b, "p")
    assert diffs == pytest.approx([0.2, 0.0, -0.1]) and weights == [1.0] * 3 and arts == ["A", "A", "B"]
    with pytest.raises(ValueError, match="different items"):
        paired(a, b[:2], "p")
    with pytest.raises(ValueError, match="span"):
        paired(a, [b[0], rec("k1", "A", 0.3, span="y"), b[2]], "p")


def test_cluster_bootstrap_hand_computed():
    # clusters A = {1, 3} and B = {10}: resamples AA, AB/BA, BB give 2, 14/3, 10 with probabilities 1/4, 1/2, 1/4
    iv = cluster_bootstrap([1.0, 3.0, 10.0], ["A", "A", "B"], n_boot=4000, seed=1)
    assert (iv.estimate, iv.low, iv.high, iv.n, iv.clusters) == (pytest.approx(14 / 3), 2.0, 10.0, 3, 2)
    halved = cluster_bootstrap([1.0, 3.0, 10.0], ["A", "A", "B"], n_boot=4000, seed=1, scale=2.0)
    assert (halved.estimate, halved.low, halved.high) == (pytest.approx(7 / 3), 1.0, 5.0)
    one = cluster_bootstrap([0.5, 1.5], ["A", "A"], n_boot=50)  # one cluster: no spread
    assert one.estimate == one.low == one.high == 1.0


def test_per_token_nll_difference_weights_by_tokens():
    # per-token NLL: A items 2 and 4 tokens, B item 4 tokens; differences 0.6, 1.2 and -0.8 nats in total
    a = [rec("k1", "A", 0, nll=2.0, tokens=2), rec("k2", "A", 0, nll=4.0, tokens=4),
         rec("k3", "B", 0, nll=4.0, tokens=4)]
    b = [rec("k1", "A", 0, nll=2.6, tokens=2), rec("k2", "A", 0, nll=5.2, tokens=4),
         rec("k3", "B", 0, nll=3.2, tokens=4)]
    iv = compare(a, b, "nll", n_boot=4000, seed=2)
    # all: 1.0 / 10 = 0.1; only A: 1.8 / 6 = 0.3; only B: -0.8 / 4 = -0.2
    assert iv.estimate == pytest.approx(0.1) and iv.low == pytest.approx(-0.2) and iv.high == pytest.approx(0.3)
