"""Our logits processing against transformers' own warpers/processors."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from promptfleet.platform.sampling import (SamplerRow, SamplingParams, apply_repetition_penalty,
                                           filter_top_k_top_p, sample)


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
