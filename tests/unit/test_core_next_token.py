"""RPT next-token samples [PZ §3.1, RPT §2-3]: top-K entropy, token byte ends, entropy positions, the Samples."""
import math
import random

import pytest

from megatron_pz.data.corpus import Paragraph
from megatron_pz.data.next_token import (
    NextTokenConfig,
    next_token_samples,
    select_entropy_positions,
    token_byte_ends,
    topk_entropy,
)
from megatron_pz.data.prompts import PromptConfig, next_token_prompt
from megatron_pz.errors import ConfigError
from megatron_pz.rewards.rpt import rpt_prefix
from megatron_pz.types import Task

PLAIN = PromptConfig()


# ---------------------------------------------------------------- entropy from top-K log-probs
def test_topk_entropy_hand_computed():
    ln2 = math.log(2)
    # the whole distribution (0.5, 0.25, 0.25): H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    assert topk_entropy([-ln2, -2 * ln2, -2 * ln2]) == pytest.approx(1.5 * ln2, abs=1e-12)
    # top-2 of it (0.5, 0.25) renormalised to (2/3, 1/3): H = ln 3 - (2/3) ln 2, whatever the order
    assert topk_entropy([-2 * ln2, -ln2]) == pytest.approx(math.log(3) - 2 / 3 * ln2, abs=1e-12)
    assert topk_entropy([-0.3]) == 0.0  # one token: certain
    assert topk_entropy([math.log(0.25)] * 4) == pytest.approx(math.log(4), abs=1e-12)  # uniform over 4: ln 4
    assert topk_entropy([0.0, -1000.0]) == pytest.approx(0.0, abs=1e-12)  # a vanishing tail adds nothing
    assert math.isnan(topk_entropy([]))  # the first token: no distribution


# ---------------------------------------------------------------- token byte ends
def _decoder(pieces):
    """A byte-level tokenizer over ``pieces`` (bytes per token id); a cut character decodes to U+FFFD."""
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_token_byte_ends_hand_computed():
    pieces = [b"The", b" caf", b"\xc3", b"\xa9", b" \xf0\x9f", b"\x98\x80", b"!"]  # "The café 😀!"
    text = "The café 😀!"
    decode = _decoder(pieces)
    # "The" 3, " caf" 7, "\xc3" cut inside é -> 8 (one byte into é, bytes 7-8), é complete 9,
    # " \xf0\x9f" cut inside 😀 (bytes 10-13): complete " " ends at 10 -> 11, 😀 complete 14, "!" 15
    assert token_byte_ends(text, list(range(7)), decode) == [3, 7, 8, 9, 11, 14, 15]
    assert token_byte_ends("", [], decode) == []
    with pytest.raises(ValueError, match="do not decode"):
        token_byte_ends("The cat", [0, 1], decode)


# ---------------------------------------------------------------- entropy positions
ENT = [9.0, 0.1, 5.0, 0.2, 4.0, 0.3, 3.0, 0.4, 2.0, 0.5, 1.0]  # T = 11, predictable positions 1..10


def positions(entropies=ENT, seed=0, eligible=None, k=10, **kw):
    cfg = NextTokenConfig(**{"min_context_tokens": 1, **kw})
    return select_entropy_positions(entropies, k, cfg, random.Random(seed), eligible)


def test_top_20_percent_entropy_positions():
    # top ceil(0.2 * 10) = 2 of positions 1..10: entropies 5.0 (pos 2) and 4.0 (pos 4); position 0 never counts
    assert positions() == [2, 4]
    assert positions(top_entropy_frac=0.5) == [2, 4, 6, 8, 10]
    assert positions(min_context_tokens=3) == [4]
    assert positions(eligible=[True] * 4 + [False] * 7) == [2]
    assert positions(entropies=[0.0] + [1.0] * 4, top_entropy_frac=0.5) == [1, 2]  # ties: earlier first
    nan_at_2 = list(ENT)
    nan_at_2[2] = float("nan")
    assert positions(entropies=nan_at_2) == [4, 6]
    assert positions(entropies=[1.0]) == []


def test_entropy_position_draw_is_seeded():
    draws = {tuple(positions(seed=s, k=1)) for s in range(20)}
    assert draws == {(2,), (4,)}
    assert positions(seed=3, k=1) == positions(seed=3, k=1)


# ---------------------------------------------------------------- next-token samples
def test_next_token_samples_hand_computed():
    para = Paragraph("p", "t", "The cat sat.")
    ends = [3, 7, 11, 12]  # tokens "The", " cat", " sat", "."
    cfg = NextTokenConfig(min_context_tokens=1)
    samples = next_token_samples(para, ends, [0.0, 0.5, 3.0, 0.1], "ntp/p", 1, 4, cfg, PLAIN, random.Random(0))
    assert len(samples) == 4 and {s.group_id for s in samples} == {"ntp/p/pos2"}
    m = samples[0].metadata
    assert (m["position"], m["context"], m["target"], m["gt_token_byte_ends"]) == (2, "The cat", " sat.", [4, 5])
    assert m["entropy"] == 3.0
    assert samples[0].prompt_text == next_token_prompt("The cat", PLAIN)
    assert samples[0].task is Task.NEXT_TOKEN
    assert rpt_prefix("\\boxed{ sat}", m["target"], gt_token_byte_ends=m["gt_token_byte_ends"]) == 1.0
    assert rpt_prefix("\\boxed{ sa}", m["target"], gt_token_byte_ends=m["gt_token_byte_ends"]) == 0.0
    short = next_token_samples(para, ends, [0.0, 0.5, 3.0, 0.1], "n", 1, 1, NextTokenConfig(min_context_tokens=1,
                               max_target_tokens=1), PLAIN, random.Random(0))
    assert (short[0].metadata["target"], short[0].metadata["gt_token_byte_ends"]) == (" sat", [4])


def test_next_token_skips_positions_inside_a_utf8_character():
    para = Paragraph("p", "t", "aé b")  # bytes: a | c3 | a9 | ' ' b  -> a token boundary inside "é"
    ends = [1, 2, 3, 5]
    cfg = NextTokenConfig(min_context_tokens=1, top_entropy_frac=1.0)
    samples = next_token_samples(para, ends, [0.0, 1.0, 9.0, 2.0], "n", 3, 1, cfg, PLAIN, random.Random(0))
    assert [s.metadata["position"] for s in samples] == [1, 3]
    assert [s.metadata["context"] for s in samples] == ["a", "aé"]


def test_next_token_input_validation():
    para = Paragraph("p", "t", "abc")
    with pytest.raises(ValueError, match="differ in length"):
        next_token_samples(para, [1, 3], [0.0], "n", 1, 1, NextTokenConfig(), PLAIN, random.Random(0))
    with pytest.raises(ValueError, match="strictly increasing"):
        next_token_samples(para, [2, 2, 3], [0.0] * 3, "n", 1, 1, NextTokenConfig(), PLAIN, random.Random(0))
    with pytest.raises(ValueError, match="strictly increasing"):
        next_token_samples(para, [1, 2], [0.0] * 2, "n", 1, 1, NextTokenConfig(), PLAIN, random.Random(0))
