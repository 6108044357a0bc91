"""Backend checks at engine startup: an explicit backend that cannot run is refused
with the reason, and ``auto`` picks the fastest that can, saying why. The GPU cases run
on a described device (``DeviceProbe``), as flash-attn 2 and FlexAttention document
their limits (flash: CUDA, fp16/bf16, capability >= 8.0, head_dim multiple of 8 <= 256)."""
from __future__ import annotations

import logging

import pytest
import torch

from promptfleet.platform.attention_backend import DeviceProbe, choose_attention
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine

CUDA = torch.device("cuda")
H200 = DeviceProbe(capability=(9, 0), flash_attn=True, flex_attention=True)
T4 = DeviceProbe(capability=(7, 5), flash_attn=True, flex_attention=True)
NO_WHEEL = DeviceProbe(capability=(9, 0), flash_attn=False, flex_attention=True)


@pytest.mark.parametrize("device, dtype, head_dim, probe, message", [
    (torch.device("cpu"), torch.float32, 64, H200, "CUDA only"),
    (CUDA, torch.float32, 64, H200, "float16 or bfloat16, not float32"),
    (CUDA, torch.float16, 64, T4, r"compute capability >= 8.0 \(this GPU has 7.5\)"),
    (CUDA, torch.float16, 320, H200, "head_dim a multiple of 8 up to 256, not 320"),
    (CUDA, torch.float16, 60, H200, "head_dim a multiple of 8 up to 256, not 60"),
    (CUDA, torch.float16, 64, NO_WHEEL, "flash_attn package is not installed"),
])
def test_flash_that_cannot_run_is_refused_with_the_reason(device, dtype, head_dim, probe, message):
    with pytest.raises(ValueError, match=f"attention backend 'flash' cannot run here: .*{message}"):
        choose_attention("flash", device, dtype, head_dim, probe)


def test_flash_is_accepted_where_it_runs():
    assert choose_attention("flash", CUDA, torch.bfloat16, 128, H200).name == "flash"


@pytest.mark.parametrize("dtype, head_dim, probe, want, why", [
    (torch.float16, 64, H200, "flash", "auto on cuda float16, head_dim 64"),
    (torch.float16, 64, NO_WHEEL, "flex", "not flash: the flash_attn package is not installed"),
    (torch.float16, 64, T4, "flex", "not flash: flash-attn 2 needs compute capability"),
    (torch.float32, 64, H200, "flex", "not flash: flash-attn takes float16 or bfloat16"),
    (torch.float16, 80, NO_WHEEL, "sdpa", "not flex: FlexAttention's decode path takes a power-of-two head_dim"),
    (torch.float16, 64, DeviceProbe(capability=(9, 0), flash_attn=False, flex_attention=False), "sdpa",
     "not flex: this torch has no torch.nn.attention.flex_attention"),
])
def test_auto_on_cuda_validates_before_picking_and_says_why(dtype, head_dim, probe, want, why):
    choice = choose_attention("auto", CUDA, dtype, head_dim, probe)
    assert choice.name == want
    assert why in choice.reason


def test_flex_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="'flex' cannot run here: .*power-of-two head_dim"):
        choose_attention("flex", CUDA, torch.float16, 80, H200)
    with pytest.raises(ValueError, match="'flex' cannot run here: no CUDA device is visible"):
        choose_attention("flex", CUDA, torch.float16, 64, DeviceProbe(None, False, True))


def test_engine_refuses_an_impossible_backend_at_startup_and_logs_its_pick(small_checkpoint, caplog):
    with pytest.raises(ValueError, match="attention backend 'flash' cannot run here: flash-attn runs on CUDA only"):
        Engine.from_pretrained(small_checkpoint, EngineConfig(attention="flash"))
    with caplog.at_level(logging.INFO, logger="promptfleet.platform.engine"):
        engine = Engine.from_pretrained(small_checkpoint, EngineConfig(attention="sdpa", kv_cache_bytes=1 << 20))
    assert "attention backend sdpa (asked for)" in caplog.text
    stats = engine.stats()
    assert stats.kv_budget_bytes == 1 << 20
    assert 0 < stats.kv_allocated_bytes == engine.cache.allocated_bytes <= stats.kv_budget_bytes
