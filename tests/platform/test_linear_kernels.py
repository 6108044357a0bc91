"""oneDNN-packed linears against torch's own ``F.linear`` (+ activation), at every row
count the engine can send: inside the padded buckets, at their edges and past MAX_ROWS."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptfleet.platform.linear_kernels import (MAX_ROWS, PackedLinear, bucket_rows, onednn_linear_available,
                                                 row_buckets)

pytestmark = pytest.mark.skipif(not onednn_linear_available(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN")

ACTS = {None: lambda y: y, "gelu_new": lambda y: F.gelu(y, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 64, 65, 129, 255, MAX_ROWS, MAX_ROWS + 1, 3 * MAX_ROWS + 5])
def test_packed_linear_matches_torch(rows, activation):
    torch.manual_seed(rows)
    linear = nn.Linear(48, 80)
    x = torch.randn(rows, 48) * 2
    with torch.inference_mode():
        got = PackedLinear(linear, activation=activation)(x)
        want = ACTS[activation](F.linear(x, linear.weight, linear.bias))
    assert got.shape == (rows, 80)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_leading_dims_are_kept_and_a_bare_weight_has_no_bias():
    weight = torch.randn(30, 16)
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        got = PackedLinear(weight)(x)
    assert got.shape == (2, 5, 30) and torch.allclose(got, x @ weight.T, atol=1e-5)


def test_row_buckets_are_few_and_waste_little():
    buckets = row_buckets()
    assert len(buckets) <= 16 and buckets[-1] == MAX_ROWS
    for rows in range(1, MAX_ROWS + 1):
        padded = bucket_rows(rows)
        assert padded in buckets and padded >= rows
        assert padded - rows < (8 if rows <= 64 else 16 if rows <= 128 else 32), rows
        assert rows < 64 or (padded - rows) / rows < 0.25, rows
