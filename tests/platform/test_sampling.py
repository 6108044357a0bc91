"""Our logits processing against transformers' own warpers/processors."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from promptfleet.platform.sampling import (SamplerRow, SamplingParams, apply_repetition_penalty, draw,
                                           filter_top_k_top_p, sample)
from promptfleet.testing.hf_sampling import hf_top_k_top_p


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_matches_transformers(logits, k):
    want = TopKLogitsWarper(top_k=k)(None, logits[None].clone())[0]
    got = filter_top_k_top_p(logits, k, 1.0)
    assert torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(logits, p):
    want = TopPLogitsWarper(top_p=p)(None, logits[None].clone())[0]
    got = filter_top_k_top_p(logits, 0, p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))


def test_batched_filter_matches_transformers_row_by_row():
    """One call over rows with different top_k / top_p (0 / 1.0 = off) equals HF's warpers
    applied to each row alone, in HF's order (top-k, then top-p)."""
    x = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)) * 3
    ks, ps = [0, 5, 50, 0, 1, 20], [1.0, 1.0, 0.9, 0.5, 0.3, 0.95]
    got = filter_top_k_top_p(x, ks, ps)
    for r in range(6):
        want = hf_top_k_top_p(x[r:r + 1], ks[r], ps[r])
        assert torch.equal(torch.isinf(got[r]), torch.isinf(want[0])), r
    assert not torch.isinf(x).any()  # the input is left alone


def test_draw_follows_the_distribution_and_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.25, 0.0, 0.05]])
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    counts = torch.bincount(torch.tensor([draw(probs, [gen])[0] for _ in range(n)]), minlength=6).double()
    assert counts[1] == counts[4] == 0
    sigma = (n * probs[0] * (1 - probs[0])).sqrt()
    assert ((counts - n * probs[0]).abs() <= 4 * sigma + 1).all(), counts


def test_nucleus_at_every_candidate_width_matches_transformers():
    """A peaked row finds its nucleus among the top 256, a row with ~1000 likely tokens
    among the top 4096, a flat 50k-token row only in the full sort. All must equal HF's TopP."""
    gen = torch.Generator().manual_seed(3)
    peaked = torch.randn(50257, generator=gen) * 8
    middle = torch.randn(50257, generator=gen) * 0.1
    middle[torch.randperm(50257, generator=gen)[:1000]] += 12
    flat = torch.randn(50257, generator=gen) * 0.1
    x = torch.stack([peaked, middle, flat])
    got = filter_top_k_top_p(x, 0, 0.9)
    for r in range(3):
        want = TopPLogitsWarper(top_p=0.9)(None, x[r:r + 1].clone())[0]
        assert torch.equal(torch.isinf(got[r]), torch.isinf(want)), r
    kept = (~torch.isinf(got)).sum(-1)
    assert kept[0] < 256 < kept[1] < 4096 < kept[2]  # one row on each path


def test_draw_over_many_blocks_hits_each_token_at_its_rate():
    vocab = 1000  # four draw blocks, the last one padded
    probs = torch.zeros(1, vocab)
    support = {0: 0.1, 255: 0.2, 256: 0.3, 700: 0.15, 999: 0.25}  # block edges and the padded tail
    for t, q in support.items():
        probs[0, t] = q
    gen = torch.Generator().manual_seed(1)
    n = 20_000
    counts = torch.bincount(torch.tensor([draw(probs, [gen])[0] for _ in range(n)]), minlength=vocab).double()
    assert set(counts.nonzero().flatten().tolist()) == set(support)
    for t, q in support.items():
        assert abs(counts[t] - n * q) <= 4 * (n * q * (1 - q)) ** 0.5 + 1, (t, counts[t])


def test_a_seeded_row_draws_the_same_whatever_its_batch_mates(logits):
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=7)
    other = SamplingParams(temperature=1.3, top_p=0.5, repetition_penalty=1.2)
    alone = sample(logits[None].clone(), [SamplerRow(seeded, [], torch.Generator().manual_seed(7))],
                   torch.Generator())
    mates = torch.stack([logits.flip(0), logits, logits * 0.5])
    rows = [SamplerRow(other, [1, 2, 3]), SamplerRow(seeded, [], torch.Generator().manual_seed(7)),
            SamplerRow(SamplingParams(temperature=0), [])]
    before = mates.clone()
    together = sample(mates, rows, torch.Generator().manual_seed(123))
    assert together[1] == alone[0]
    assert together[2] == int(mates[2].argmax())
    assert torch.equal(mates, before)


def test_repetition_penalty_matches_transformers(logits):
    history = [3, 17, 17, 999, 0]
    want = RepetitionPenaltyLogitsProcessor(penalty=1.3)(torch.tensor([history]), logits[None].clone())[0]
    assert torch.allclose(apply_repetition_penalty(logits, history, 1.3), want)


def test_seeded_sampling_reproduces(logits):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=42)
    rows = lambda: [SamplerRow(params, [], torch.Generator().manual_seed(42))]  # noqa: E731
    batch = logits[None]
    draws = [sample(batch, rows(), torch.Generator()) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]


def test_greedy_is_argmax(logits):
    assert sample(logits[None], [SamplerRow(SamplingParams(temperature=0), [])], torch.Generator()) == [
        int(logits.argmax())]


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(repetition_penalty=0), dict(stop=("",))])
def test_bad_params_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
