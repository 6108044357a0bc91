"""Fixtures for the registry tests: PEFT adapters made with PEFT itself on the tiny
checkpoint, archive builders for hostile uploads, blob storage and a tenant."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save as save_safetensors

from promptfleet.testing import tar_gz_with
from promptfleet.adapters.storage import LocalBlobStorage
from promptfleet.db import session_scope
from promptfleet.platform.config import ModelConfig
from promptfleet.tenants.service import create_tenant


def make_peft_adapter(checkpoint: Path, out_dir: Path, kind: str, *, seed: int = 0, num_virtual_tokens: int = 5):
    """A real PEFT adapter (save_pretrained folder) with seeded random, non-trivial weights.
    Returns (out_dir, peft_model)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    configs = {
        "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens),
        "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens),
        "ptuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                               encoder_hidden_size=32),
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]),
    }
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(checkpoint), configs[kind]())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen))
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir, model


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    return tar_gz_with(files)


def dir_files(path: Path, *, folder: str | None = None) -> dict[str, bytes]:
    """The files of a folder as an archive's member dict (optionally under one folder)."""
    return {(f"{folder}/{p.name}" if folder else p.name): p.read_bytes() for p in sorted(path.iterdir())}


def prompt_tuning_files(cfg: ModelConfig, *, n: int = 4, seed: int = 0, width: int | None = None,
                        values: torch.Tensor | None = None, **overrides) -> tuple[dict, bytes]:
    """A PEFT-shaped PROMPT_TUNING adapter built by hand: (config dict, safetensors bytes)."""
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
              "token_dim": cfg.n_embd, "num_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_transformer_submodules": 1, "inference_mode": True, "prompt_tuning_init": "RANDOM"}
    config.update(overrides)
    emb = values if values is not None else torch.randn(n, width or cfg.n_embd,
                                                        generator=torch.Generator().manual_seed(seed))
    return config, save_safetensors({"prompt_embeddings": emb.contiguous()})


@pytest.fixture(scope="session")
def tiny_config(tiny_checkpoint: Path) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def prompt_adapter_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT PROMPT_TUNING adapter folder for the tiny checkpoint (made once)."""
    return make_peft_adapter(tiny_checkpoint, tmp_path_factory.mktemp("prompt-adapter"), "prompt", seed=7)[0]


@pytest.fixture
def helpers():
    return SimpleNamespace(zip_bytes=zip_bytes, tar_gz_bytes=tar_gz_bytes, dir_files=dir_files,
                           prompt_tuning_files=prompt_tuning_files, make_peft_adapter=make_peft_adapter,
                           json=json)


@pytest.fixture
def storage(tmp_path: Path) -> LocalBlobStorage:
    return LocalBlobStorage(tmp_path / "blobs")


@pytest.fixture
def tenant_id(session_factory) -> str:
    with session_scope(session_factory) as s:
        tenant, _ = create_tenant(s, name="tenant-a")
        return tenant.id


@pytest.fixture
def other_tenant_id(session_factory) -> str:
    with session_scope(session_factory) as s:
        tenant, _ = create_tenant(s, name="tenant-b")
        return tenant.id
