"""Adapters made by PEFT survive import -> blob -> export: PEFT loads the export and
generates exactly what the original adapter generated; our engine parses the same weights."""
from __future__ import annotations

import hashlib
import io
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from promptfleet.adapters.service import export_adapter, import_adapter, load_adapter_weights
from promptfleet.db import session_scope
from promptfleet.platform.adapter import build_prefix
from promptfleet.platform.weights import load_gpt2
from promptfleet.testing.archives import dir_files, tar_gz_with, zip_bytes
from promptfleet.testing.peft import make_peft_adapter

PROMPT = torch.tensor([[464, 2068, 7586, 21831, 18045, 625]])


def _greedy(model) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=8,
                             do_sample=False, pad_token_id=50256)
    return out[0, PROMPT.shape[1]:].tolist()


@pytest.mark.parametrize("kind,fmt,folder", [("prompt_tuning", "zip", None),
                                             ("prefix_tuning", "tar.gz", "prefix-adapter"),
                                             ("p_tuning", "zip", "ptuning-adapter")])
def test_peft_round_trip(kind, fmt, folder, session_factory, storage, tenant_id, tiny_checkpoint, tiny_config,
                         tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    src = make_peft_adapter(tiny_checkpoint, tmp_path / "src", kind, 5, seed=11)
    original = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_checkpoint), src).eval()
    expected = _greedy(original)
    assert _greedy(GPT2LMHeadModel.from_pretrained(tiny_checkpoint)) != expected  # the adapter matters
    files = dir_files(src, folder=folder)
    archive = (zip_bytes if fmt == "zip" else tar_gz_with)(files)

    with session_scope(session_factory) as s:
        version = import_adapter(s, storage=storage, tenant_id=tenant_id, name=f"{kind}-rt", archive=archive,
                                 model_config=tiny_config)
    with session_scope(session_factory) as s:
        exported = export_adapter(s, storage=storage, tenant_id=tenant_id, ref=f"{kind}-rt@1")
    assert version.sha256 == hashlib.sha256(exported).hexdigest()

    out = tmp_path / "exported"
    zipfile.ZipFile(io.BytesIO(exported)).extractall(out)
    reloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_checkpoint), out).eval()
    assert _greedy(reloaded) == expected

    # The engine side reads the very same tensor from the blob and can build its KV prefix.
    weights = load_adapter_weights(storage=storage, version=version)
    saved = load_file(src / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(weights.prompt_embeddings, saved.float())
    assert weights.peft_type == kind.upper()
    prefix = build_prefix(load_gpt2(tiny_checkpoint), weights, "k")
    assert prefix.k.shape == (tiny_config.n_layer, tiny_config.n_head, 5, tiny_config.head_dim)
