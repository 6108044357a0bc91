"""The sampler's device code path, run on CPU: the GPU's nucleus (one full sort) against
transformers' warpers, and seeded draws against the textbook inverse CDF of
transformers' processed distribution at the uniform the row's own seed gives. Only int32
ids come back, -1 for a row that cannot be sampled."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

from promptfleet.platform.device_sampler import SamplerPlan
from promptfleet.platform.sampling import SamplerRow, SamplingParams, filter_rows
from promptfleet.platform.staging import StepStaging
from promptfleet.testing.hf_sampling import hf_top_k_top_p

VOCAB = 3000  # several draw blocks, the last one partial


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_full_sort_nucleus_matches_transformers():
    x = _logits(4)
    ks, ps = [0, 50, 0, 7], [0.9, 0.5, 1.0, 0.3]
    got = filter_rows(x, torch.tensor(ks), torch.tensor(ps, dtype=torch.float64), max_k=50, any_p=True,
                      exact_sort=True)
    for r in range(4):
        want = hf_top_k_top_p(x[r:r + 1], ks[r], ps[r])
        assert torch.equal(torch.isinf(got[r]), torch.isinf(want[0])), r


def _hf_token(logits: torch.Tensor, history: list[int], p: SamplingParams, u: float) -> int:
    """transformers' processors, then the smallest token whose float64 CDF passes u."""
    x = logits[None].clone()
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([history]), x)
    if p.greedy:
        return int(x.argmax())
    x = hf_top_k_top_p(TemperatureLogitsWarper(p.temperature)(None, x), p.top_k, p.top_p)
    cdf = x.softmax(-1)[0].double().cumsum(0)
    return int(torch.searchsorted(cdf, u * cdf[-1], right=True))


@pytest.mark.parametrize("exact_sort", [False, True])
def test_seeded_rows_draw_transformers_distribution_at_their_own_uniform(exact_sort):
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_k=40, seed=2),
              SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=3),
              SamplingParams(temperature=0, repetition_penalty=2.0), SamplingParams(temperature=1.0, seed=4)]
    histories = [[], [], [], [5, 9, 9, 2999], [0, 1, 2], []]
    logits = _logits(len(params), seed=5)
    for step in range(3):
        rows = [SamplerRow(p, h, torch.Generator().manual_seed(p.seed + 100 * step) if p.seed else None)
                for p, h in zip(params, histories)]
        us = [float(torch.rand(1, generator=torch.Generator().manual_seed(p.seed + 100 * step),
                               dtype=torch.float64)) if p.seed else None for p in params]
        stage = StepStaging(torch.device("cpu"), pack=True)  # the device's one-copy layout
        plan = SamplerPlan.build(rows, torch.Generator(), device=torch.device("cpu"), stage=stage)
        stage.flush()
        before = logits.clone()
        got = plan.pick(logits, exact_sort=exact_sort)
        assert got.dtype == torch.int32 and torch.equal(logits, before)
        want = [_hf_token(logits[r], histories[r], p, us[r]) for r, p in enumerate(params)]
        assert got.tolist() == want
        logits = logits.roll(17, dims=1)


def test_rows_that_cannot_be_sampled_come_back_as_minus_one():
    logits = _logits(3)
    rows = [SamplerRow(SamplingParams(temperature=0.9, seed=1), [], torch.Generator().manual_seed(1)),
            SamplerRow(SamplingParams(temperature=0), []), SamplerRow(SamplingParams(temperature=0.5), [])]
    plan = SamplerPlan.build(rows, torch.Generator().manual_seed(0), device=torch.device("cpu"))
    got = plan.pick(logits, valid=torch.tensor([True, False, True]))
    assert got[1] == -1 and got[0] >= 0 and got[2] >= 0


def test_rewind_gives_a_retried_step_the_same_draws():
    gen, default = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    rows = [SamplerRow(SamplingParams(temperature=1.0, seed=7), [], gen), SamplerRow(SamplingParams(), [])]
    logits = _logits(2)
    first = SamplerPlan.build(rows, default, device=torch.device("cpu"))
    want = first.pick(logits)
    first.rewind()
    assert torch.equal(SamplerPlan.build(rows, default, device=torch.device("cpu")).pick(logits), want)
