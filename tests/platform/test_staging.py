"""One step's host tensors travel in one copy: every piece comes back with its values,
shape and dtype (int64, int32, bool, float64 bits), and the step input's tensors are
on the model's device."""
from __future__ import annotations

import pytest
import torch

from promptfleet.platform.staging import StepStaging


def test_packed_pieces_come_back_exactly():
    stage = StepStaging(torch.device("cpu"), pack=True)  # the device layout, on CPU
    pieces = {"ids": torch.tensor([[5, 7, 50256]]), "lens": torch.tensor([3, 1], dtype=torch.int32),
              "mask": torch.tensor([True, False, True]),
              "u": torch.tensor([0.1, 1 - 2 ** -53, 1e-300], dtype=torch.float64), "empty": torch.zeros(0, 4).long()}
    staged = {k: stage.add(v) for k, v in pieces.items()}
    with pytest.raises(RuntimeError, match="before its step's staging was flushed"):
        staged["ids"].get()
    stage.flush()
    assert stage.copies == 1
    for name, host in pieces.items():
        got = staged[name].get()
        assert got.dtype == host.dtype and got.shape == host.shape and torch.equal(got, host), name


def test_float32_is_refused():
    with pytest.raises(TypeError, match="staging takes"):
        StepStaging(torch.device("cpu")).add(torch.zeros(2))
