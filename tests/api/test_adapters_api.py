"""The adapter endpoints over HTTP, on SQLite and PostgreSQL: upload, versions, download,
delete, refusals, size caps, isolation between tenants, and parity with PEFT."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

from promptfleet.client import zip_directory
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.testing import api_error as _err
from promptfleet.testing.peft import make_peft_adapter


def peft_greedy(checkpoint: Path, adapter_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """PEFT's own greedy tokens (``use_cache=False``: see tests/platform/conftest.py)."""
    base = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=50256, eos_token_id=50256, use_cache=False)
    tokens = out[0, len(prompt_ids):].tolist()
    return tokens[: tokens.index(50256)] if 50256 in tokens else tokens


def test_upload_list_get_download_delete(make_api, db_kind, peft_zips, peft_dirs, small_checkpoint, tmp_path):
    api = make_api(db=db_kind)
    _, h = api.new_tenant()
    r = api.upload(h, "support", peft_zips["pt"])
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert {k: v1[k] for k in ("name", "version", "peft_type", "num_virtual_tokens")} == {
        "name": "support", "version": 1, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5}
    assert len(v1["sha256"]) == 64 and v1["created_at"] and v1["id"] == "support@1"

    v2 = api.upload(h, "support", peft_zips["pt_v2"]).json()
    assert v2["version"] == 2 and v2["num_virtual_tokens"] == 3 and v2["sha256"] != v1["sha256"]
    assert api.upload(h, "prefixed", peft_zips["prefix"]).json()["peft_type"] == "PREFIX_TUNING"

    listed = api.client.get("/v1/adapters", headers=h).json()["data"]
    assert [(a["name"], a["version"]) for a in listed] == [("prefixed", 1), ("support", 2)]
    assert api.client.get("/v1/adapters/support", headers=h).json()["version"] == 2
    assert api.client.get("/v1/adapters/support@1", headers=h).json()["sha256"] == v1["sha256"]
    _err(api.client.get("/v1/adapters/support@3", headers=h), 404, "adapter_not_found")
    _err(api.client.get("/v1/adapters/support@x", headers=h), 404)

    models = [m["id"] for m in api.client.get("/v1/models", headers=h).json()["data"]]
    assert models == ["gpt2", "prefixed", "support"]
    assert api.client.get("/v1/models/support@1", headers=h).json()["id"] == "support@1"
    _err(api.client.get("/v1/models/nope", headers=h), 404, "model_not_found")

    # download: a zip PeftModel.from_pretrained loads, with the uploaded weights
    r = api.client.get("/v1/adapters/support@1/download", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert "support-v1.zip" in r.headers["content-disposition"]
    out = tmp_path / "downloaded"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(small_checkpoint), out)
    original = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(small_checkpoint), peft_dirs["pt"])
    torch.testing.assert_close(loaded.get_prompt_embedding_to_save("default"),
                               original.get_prompt_embedding_to_save("default"))

    # delete one version, then the name
    assert api.client.delete("/v1/adapters/support@2", headers=h).status_code == 204
    assert api.client.get("/v1/adapters/support", headers=h).json()["version"] == 1
    r = api.client.delete("/v1/adapters/support", headers=h)
    assert r.status_code == 204 and r.content == b""
    _err(api.client.get("/v1/adapters/support", headers=h), 404)
    _err(api.client.delete("/v1/adapters/support", headers=h), 404)
    _err(api.client.post("/v1/completions", json={"model": "support", "prompt": "x"}, headers=h), 404,
         "model_not_found")


def test_other_tenants_adapters_are_404(make_api, db_kind, peft_zips):
    api = make_api(db=db_kind)
    _, alice = api.new_tenant("alice")
    _, bob = api.new_tenant("bob")
    assert api.upload(alice, "secret", peft_zips["pt"]).status_code == 201
    mine = api.client.get("/v1/adapters/nosuch", headers=bob)
    theirs = api.client.get("/v1/adapters/secret", headers=bob)
    _err(theirs, 404)
    assert theirs.json()["error"]["message"].replace("secret", "X") == \
        mine.json()["error"]["message"].replace("nosuch", "X")
    _err(api.client.get("/v1/adapters/secret@1/download", headers=bob), 404)
    _err(api.client.delete("/v1/adapters/secret", headers=bob), 404)
    _err(api.client.post("/v1/completions", json={"model": "secret", "prompt": "x"}, headers=bob), 404,
         "model_not_found")
    assert api.client.get("/v1/adapters", headers=bob).json()["data"] == []
    assert [m["id"] for m in api.client.get("/v1/models", headers=bob).json()["data"]] == ["gpt2"]
    # bob may use the same name: his own version 1
    assert api.upload(bob, "secret", peft_zips["pt_v2"]).json()["version"] == 1
    assert api.client.get("/v1/adapters/secret", headers=alice).json()["num_virtual_tokens"] == 5


def test_refused_uploads_store_nothing(make_api, peft_dirs, tiny_checkpoint, tmp_path):
    api = make_api()
    _, h = api.new_tenant()
    _err(api.upload(h, "a", b"not an archive at all"), 400, "adapter_rejected")
    # a pickle is refused, never loaded
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(peft_dirs["pt"] / "adapter_config.json", "adapter_config.json")
        zf.writestr("adapter_model.bin", b"\x80\x04pickle")
    err = _err(api.upload(h, "a", buf.getvalue()), 400, "adapter_rejected")
    assert "pickle" in err["message"]
    # an adapter for another backbone (d=64, this server runs d=128)
    other = make_peft_adapter(tiny_checkpoint, tmp_path / "tiny-pt", "prompt_tuning", 4, 1)
    err = _err(api.upload(h, "a", zip_directory(other)), 400, "adapter_rejected")
    assert "does not fit this backbone" in err["message"]
    _err(api.upload(h, "bad/name", zip_directory(peft_dirs["pt"])), 400, "invalid_adapter_name")
    _err(api.client.post("/v1/adapters", data={"name": "a"}, headers=h), 400)
    _err(api.client.post("/v1/adapters", files={"file": ("a.zip", b"x")}, headers=h), 400)
    assert api.client.get("/v1/adapters", headers=h).json()["data"] == []
    assert not any(p.is_file() for p in (api.settings.blob_dir).rglob("*"))


def test_upload_size_cap_is_413_before_reading_the_body(make_api):
    api = make_api(max_upload_mb=1)
    _, h = api.new_tenant()
    big = b"PK\x03\x04" + b"\0" * (2 << 20)
    err = _err(api.upload(h, "big", big), 413, "request_too_large")
    assert "1 MiB (max_upload_mb)" in err["message"]

    # no Content-Length (chunked): counted while streaming, cut at the cap
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n--{boundary}\r\n'
            'Content-Disposition: form-data; name="file"; filename="a.zip"\r\n'
            'Content-Type: application/zip\r\n\r\n').encode()
    def body():
        yield head
        for _ in range(64):  # 4 MiB in 64 KiB chunks
            yield b"\0" * (64 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = api.client.post("/v1/adapters", content=body(), headers={
        **h, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    _err(r, 413, "request_too_large")
    assert api.client.get("/v1/adapters", headers=h).json()["data"] == []


def test_http_uploaded_adapter_serves_pefts_tokens(make_api, db_kind, peft_zips, peft_dirs, small_checkpoint):
    api = make_api(db=db_kind)
    _, h = api.new_tenant()
    tok = load_tokenizer(small_checkpoint)
    for name in ("pt", "prefix"):
        assert api.upload(h, name, peft_zips[name]).status_code == 201
        for prompt in ("The quick brown fox", "Hello"):
            ids = tok.encode(prompt)
            want = tok.decode(peft_greedy(small_checkpoint, peft_dirs[name], ids, 10))
            r = api.client.post("/v1/completions", headers=h, json={
                "model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want, (name, prompt)
            r = api.client.post("/v1/completions", headers=h, json={
                "model": f"{name}@1", "prompt": ids, "max_tokens": 10, "temperature": 0})
            assert r.json()["choices"][0]["text"] == want
