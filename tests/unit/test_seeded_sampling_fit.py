"""The embedded engine's seeded draws follow the distribution the engine records: a chi-square goodness of fit.

``rollout.reproducible`` (the default) samples every row from its own seeded generator (``engine/generation.py``
``SeededSampler``; seeds from ``rollout/seeds.py``). Here 8,000 rows of one prompt (1,000 prompts x 8 samples, the
trainer's layout: prompt g seeded base + g, its sample j ``sample_seed(base + g, j)``, all 8,000 seeds distinct)
draw their first token; its counts are compared with the probabilities the engine itself reports for that position
(``prompt_logprobs`` over the whole vocabulary, tempered and, for top-p, cut to the nucleus and renormalised).
The per-row log-probs the engine records while sampling must be those same probabilities.

Bins: every token expecting at least 5 draws is its own bin; the rest are pooled into one bin (merged with the
smallest single bin if the pool itself expects fewer than 5), so every bin expects >= 5 (the usual condition for
the chi-square approximation). df = bins - 1 (nothing is fitted).

False alarms: a correct sampler fails with probability ALPHA = 0.001 per comparison; the test makes 4 of them,
so about 0.4 % of seed choices would fail a correct sampler. The seeds are fixed, so a given tree passes or fails
deterministically; a failure after a change of seed alone is that 0.4 %, after a change of the sampler it is the
sampler. ``test_the_statistic_rejects_wrong_distributions`` shows the same statistic on the same draws refusing a
temperature 15 % off and the un-truncated distribution of a top-p draw.

The chi-square tail is computed here (``chi2_sf``, closed forms of the regularised upper incomplete gamma function
for integer df), checked against exact values and, where installed, scipy: the package does not depend on scipy.
"""
import math
from collections import Counter

import pytest
import torch

from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.rollout.protocol import SamplingParams
from megatron_pz.rollout.seeds import prompt_seeds, sample_seed

# tiny (a random tiny Llama with a byte tokenizer, 260 ids) and one_thread come from tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 1e-3  # per comparison; see the module docstring for the false-alarm rate
PROMPTS, SAMPLES = 1000, 8
SEED = 20251203
MIN_EXPECTED = 5.0


# ---------------------------------------------------------------------------- the statistic
def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with integer ``df``: Q(df/2, x/2), by the closed forms
    Q(m, y) = e^-y sum_{j<m} y^j / j!  and  Q(m + 1/2, y) = erfc(sqrt y) + e^-y sum_{j<m} y^(j+1/2) / Gamma(j + 3/2)
    (from Q(a + 1, y) = Q(a, y) + y^a e^-y / Gamma(a + 1)), each term in log space."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if x <= 0:
        return 1.0
    y = x / 2
    if df % 2 == 0:
        total, offset = 0.0, 0.0
    else:
        total, offset = math.erfc(math.sqrt(y)), 0.5
    for j in range(df // 2):
        total += math.exp((j + offset) * math.log(y) - y - math.lgamma(j + offset + 1))
    return min(total, 1.0)


def binned(probs: torch.Tensor, counts: Counter, total: int) -> tuple[list[float], list[int]]:
    """(expected, observed) per bin over the vocabulary (module docstring), every bin expecting >= MIN_EXPECTED."""
    expected = (probs.double() * total).tolist()
    alone = sorted((t for t, e in enumerate(expected) if e >= MIN_EXPECTED), key=lambda t: expected[t])
    rest = [t for t, e in enumerate(expected) if e < MIN_EXPECTED]
    bins = [[t] for t in alone]
    if rest:
        if sum(expected[t] for t in rest) >= MIN_EXPECTED or not bins:
            bins.append(rest)
        else:
            bins[0] += rest  # the pool is too small alone: merge it with the least likely single bin
    return [sum(expected[t] for t in b) for b in bins], [sum(counts[t] for t in b) for b in bins]


def chi_square(probs: torch.Tensor, counts: Counter) -> tuple[float, int, float]:
    """(statistic, df, p-value) of the observed token ``counts`` against ``probs`` (V,)."""
    total = sum(counts.values())
    expected, observed = binned(probs, counts, total)
    assert min(expected) >= MIN_EXPECTED and len(expected) >= 2
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(expected) - 1
    return stat, df, chi2_sf(stat, df)


def test_chi2_sf_exact_values():
    assert chi2_sf(3.0, 2) == pytest.approx(math.exp(-1.5), rel=1e-12)  # df 2: e^(-x/2)
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)  # the 95 % quantile of df 1
    assert chi2_sf(10.82756617, 1) == pytest.approx(0.001, rel=1e-6)
    assert chi2_sf(4.0, 3) == pytest.approx(math.erfc(math.sqrt(2)) + math.sqrt(8 / math.pi) * math.exp(-2),
                                            rel=1e-12)
    assert chi2_sf(0.0, 5) == 1.0 and chi2_sf(1e4, 3) == 0.0
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)


def test_chi2_sf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 10, 57, 126, 200):
        for q in (0.5, 1.0, 1.5, 2.5):
            x = q * df
            assert chi2_sf(x, df) == pytest.approx(float(stats.chi2.sf(x, df)), rel=1e-9, abs=1e-300)


def test_binning_pools_the_unlikely_tokens():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    counts = Counter({0: 48, 1: 33, 2: 9, 3: 6, 4: 4})
    # 100 draws: 50, 30, 10 and 6 expected alone; the pool (token 4, 4 expected) joins the least likely bin (6)
    assert binned(probs, counts, 100) == (pytest.approx([10.0, 10.0, 30.0, 50.0]), [10, 9, 33, 48])
    # 1000 draws: every token alone; 40 draws: 12 and 20 alone, the pool (4 + 2.4 + 1.6 = 8 expected) is a bin
    assert binned(probs, counts, 1000)[0] == pytest.approx([40.0, 60.0, 100.0, 300.0, 500.0])
    assert binned(probs, counts, 40) == (pytest.approx([12.0, 20.0, 8.0]), [33, 48, 19])


# ---------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine(tiny):
    return EmbeddedEngine(tiny, max_batch_size=PROMPTS * SAMPLES)


def recorded_probs(engine: EmbeddedEngine, context: list[int], temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution (V,) the engine reports for the token after ``context``: its own log-probs of that position
    over the whole vocabulary (``prompt_logprobs``, temperature 1), tempered; for ``top_p`` < 1 the nucleus (the most
    likely tokens until their mass reaches ``top_p``) renormalised, the rest 0."""
    row = engine.prompt_logprobs([context + [0]], top_k=engine.vocab_size)[0].top[len(context)]
    logp = torch.full((engine.vocab_size,), float("-inf"), dtype=torch.float64)
    for value, token in row:
        logp[token] = value
    probs = torch.softmax(logp / temperature, dim=0)
    if top_p < 1.0:
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]  # the mass of the more likely tokens
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[before < top_p]] = True
        probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
    return probs


def draw(engine: EmbeddedEngine, prompt: list[int], temperature: float, top_p: float, new_tokens: int = 1):
    """PROMPTS copies of ``prompt`` x SAMPLES samples, seeded as the trainer seeds a step (module docstring)."""
    seeds = [sample_seed(s, j) for s in prompt_seeds(SEED, PROMPTS) for j in range(SAMPLES)]
    assert len(set(seeds)) == PROMPTS * SAMPLES  # every row its own stream
    params = SamplingParams(n=SAMPLES, max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, seed=SEED,
                            ignore_eos=True)
    return [r for group in engine.generate([prompt] * PROMPTS, params) for r in group]


def prompt_of(engine: EmbeddedEngine) -> list[int]:
    return engine.tokenizer("The capital of France").input_ids


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 1.0), (1.0, 0.9)],
                         ids=["plain", "temperature", "top_p"])
def test_first_token_follows_the_recorded_distribution(engine, temperature, top_p):
    prompt = prompt_of(engine)
    rows = draw(engine, prompt, temperature, top_p)
    probs = recorded_probs(engine, prompt, temperature, top_p)
    stat, df, p = chi_square(probs, Counter(r.response_ids[0] for r in rows))
    assert p > ALPHA, f"chi-square {stat:.1f} on {df} df, p = {p:.2e}"
    assert df >= 40  # a broad distribution: the test looks at many tokens, not one
    # what the engine records while sampling is log softmax(logits / T) of the drawn token (before top-p)
    tempered = torch.log_softmax(torch.log(recorded_probs(engine, prompt, temperature)), dim=0)
    got = torch.tensor([r.logprobs[0] for r in rows], dtype=torch.float64)
    want = tempered[torch.tensor([r.response_ids[0] for r in rows])]
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    if top_p < 1.0:
        assert all(probs[r.response_ids[0]] > 0 for r in rows)  # never outside the nucleus


def test_second_token_follows_the_recorded_distribution(engine):
    """The stream's second draw: among the rows whose first token is the most common one, the second token follows
    the distribution the engine reports after prompt + that token."""
    prompt = prompt_of(engine)
    rows = draw(engine, prompt, 1.0, 1.0, new_tokens=2)
    first, n_first = Counter(r.response_ids[0] for r in rows).most_common(1)[0]
    assert n_first >= 400
    seconds = Counter(r.response_ids[1] for r in rows if r.response_ids[0] == first)
    stat, df, p = chi_square(recorded_probs(engine, prompt + [first], 1.0), seconds)
    assert p > ALPHA, f"chi-square {stat:.1f} on {df} df, p = {p:.2e}"


def test_the_statistic_rejects_wrong_distributions(engine):
    """The check can fail: the same draws against a temperature 15 % off, and a top-p draw against the
    un-truncated distribution, are refused by a wide margin (measured p: 4e-40 and 1e-15 for T = 0.85 and 1.15;
    off by 10 %, 1e-9 and 6e-6)."""
    prompt = prompt_of(engine)
    plain = Counter(r.response_ids[0] for r in draw(engine, prompt, 1.0, 1.0))
    for wrong in (0.85, 1.15):
        stat, df, p = chi_square(recorded_probs(engine, prompt, wrong), plain)
        assert p < 1e-9, f"T={wrong}: chi-square {stat:.1f} on {df} df, p = {p:.2e}"
    nucleus = Counter(r.response_ids[0] for r in draw(engine, prompt, 1.0, 0.9))
    stat, df, p = chi_square(recorded_probs(engine, prompt, 1.0), nucleus)
    assert p < 1e-9, f"top-p draw vs the full distribution: chi-square {stat:.1f} on {df} df, p = {p:.2e}"


def test_rows_sharing_a_stream_are_refused(engine, monkeypatch):
    """A seeding bug the statistic must catch: every sample of a prompt drawing from the prompt's one stream (the
    8 samples of a group identical). The first token's shares are still right on average, but the draws come in
    clumps of 8, which inflates the statistic about 8-fold."""
    import megatron_pz.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "sample_seed", lambda prompt_seed, sample: prompt_seed)
    prompt = prompt_of(engine)
    rows = draw(engine, prompt, 1.0, 1.0)
    assert all(len({tuple(r.response_ids) for r in rows[g:g + SAMPLES]}) == 1 for g in range(0, len(rows), SAMPLES))
    stat, df, p = chi_square(recorded_probs(engine, prompt, 1.0), Counter(r.response_ids[0] for r in rows))
    assert p < 1e-9, f"clumped draws: chi-square {stat:.1f} on {df} df, p = {p:.2e}"
