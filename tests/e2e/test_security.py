"""Security, through HTTP against a real server process (PostgreSQL, Redis, DEBUG logging):

* tenant isolation on every endpoint: another tenant's adapter, dataset or job answers a
  404 identical to that of something that does not exist (same status, code, type and
  message up to the name), lists never show it, and nothing of the owner's changes;
* API keys are never stored in clear (every row of every table, every file of the data
  dir) and never logged (the server's whole log output, at DEBUG, across requests that
  carry keys: good, revoked, invalid, malformed, in a query string);
* hostile uploads -- zip slip, absolute paths, zip and gzip bombs, a lying zip header,
  pickles (which must never be unpickled), links in tar and zip, enormous multipart
  headers and file names, an enormous Content-Length with no body, an enormous HTTP
  header -- answer 4xx, never 5xx, and store nothing (no row, no blob, no temp file).
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import socket
import stat
import struct
import tarfile
import uuid
import zipfile
import zlib
from pathlib import Path

import httpx
import pytest

from promptfleet.testing.archives import tar_gz_with, tar_link
from promptfleet.testing.peft import make_peft_adapter

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(stack_factory):
    stack = stack_factory(log_level="DEBUG")
    stack.start_server()
    return stack


@pytest.fixture(scope="module")
def peft_files(tiny_checkpoint, tmp_path_factory) -> dict[str, bytes]:
    path = make_peft_adapter(tiny_checkpoint, tmp_path_factory.mktemp("sec") / "pt", "prompt_tuning", 4, seed=3)
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def _zip(files: dict[str, bytes]) -> bytes:
    return _zip_infos([(zipfile.ZipInfo(name), data) for name, data in files.items()])


def _zip_infos(entries: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in entries:
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


# --------------------------------------------------------------------------- isolation
def test_tenant_isolation_on_every_endpoint_is_a_404_like_missing(stack, peft_files, jsonl):
    owner, other = stack.new_tenant("owner"), stack.new_tenant("other")
    archive = _zip(peft_files)
    with stack.client(owner) as o:
        r = o.post("/v1/adapters", data={"name": "secret"}, files={"file": ("a.zip", archive, "application/zip")})
        assert r.status_code == 201, r.text
        secret = r.json()
        r = o.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(8), "application/jsonl")})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        r = o.post("/v1/jobs", json={"adapter_name": "trained", "dataset_id": dataset_id, "max_steps": 1})
        assert r.status_code == 202, r.text    # no worker in this stack: it stays queued
        job_id = r.json()["id"]
        owner_answer = o.post("/v1/completions", json={"model": "secret", "prompt": "Hi", "max_tokens": 6,
                                                       "temperature": 0}).json()["choices"][0]["text"]

    missing_ds, missing_job = uuid.uuid4().hex, uuid.uuid4().hex

    def same_404(c: httpx.Client, method: str, real: str, missing: str, real_id: str, missing_id: str,
                 **kwargs) -> None:
        if kwargs.get("json") is not None:
            kw_real = {**kwargs, "json": json.loads(json.dumps(kwargs["json"]).replace("@ID@", real_id))}
            kw_missing = {**kwargs, "json": json.loads(json.dumps(kwargs["json"]).replace("@ID@", missing_id))}
        else:
            kw_real = kw_missing = kwargs
        a = c.request(method, real.replace("@ID@", real_id), **kw_real)
        b = c.request(method, missing.replace("@ID@", missing_id), **kw_missing)
        assert a.status_code == b.status_code == 404, (method, real, a.status_code, a.text, b.status_code, b.text)
        ea, eb = a.json()["error"], b.json()["error"]
        assert (ea["code"], ea["type"], ea.get("param")) == (eb["code"], eb["type"], eb.get("param")), (ea, eb)
        assert ea["message"].replace(real_id, "<x>") == eb["message"].replace(missing_id, "<x>"), (ea, eb)
        assert set(a.headers) - {"x-request-id", "date", "content-length"} == \
            set(b.headers) - {"x-request-id", "date", "content-length"}

    completion = {"model": "@ID@", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    with stack.client(other) as c:
        for ref, missing in (("secret", "nosuch"), ("secret@1", "nosuch@1")):
            same_404(c, "GET", "/v1/adapters/@ID@", "/v1/adapters/@ID@", ref, missing)
            same_404(c, "GET", "/v1/adapters/@ID@/download", "/v1/adapters/@ID@/download", ref, missing)
            same_404(c, "GET", "/v1/models/@ID@", "/v1/models/@ID@", ref, missing)
            same_404(c, "POST", "/v1/completions", "/v1/completions", ref, missing, json=completion)
            same_404(c, "POST", "/v1/completions", "/v1/completions", ref, missing, json={**completion, "stream": True})
        same_404(c, "DELETE", "/v1/adapters/@ID@", "/v1/adapters/@ID@", "secret", "nosuch")
        same_404(c, "GET", "/v1/datasets/@ID@", "/v1/datasets/@ID@", dataset_id, missing_ds)
        same_404(c, "GET", "/v1/jobs/@ID@", "/v1/jobs/@ID@", job_id, missing_job)
        same_404(c, "POST", "/v1/jobs/@ID@/cancel", "/v1/jobs/@ID@/cancel", job_id, missing_job)
        same_404(c, "POST", "/v1/jobs", "/v1/jobs", dataset_id, missing_ds,
                 json={"adapter_name": "steal", "dataset_id": "@ID@", "max_steps": 1})
        # lists never show the owner's things
        assert c.get("/v1/adapters").json()["data"] == []
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["gpt2"]
        assert c.get("/v1/datasets").json()["data"] == []
        assert c.get("/v1/jobs").json()["data"] == []
        # the same name is another adapter in another tenant: its own version 1
        r = c.post("/v1/adapters", data={"name": "secret"}, files={"file": ("a.zip", archive, "application/zip")})
        assert r.status_code == 201 and r.json()["version"] == 1, r.text
        # a tenant key is no admin key, and the admin key is no tenant key
        assert c.get("/admin/tenants").status_code == 401
    with stack.client(stack.admin_key) as admin_as_tenant:
        assert admin_as_tenant.get("/v1/adapters").status_code == 401

    with stack.client(owner) as o:   # nothing of the owner's changed
        r = o.get("/v1/adapters/secret")
        assert r.status_code == 200 and (r.json()["version"], r.json()["sha256"]) == (1, secret["sha256"])
        assert [a["name"] for a in o.get("/v1/adapters").json()["data"]] == ["secret"]
        assert o.get(f"/v1/datasets/{dataset_id}").status_code == 200
        assert o.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert o.post("/v1/completions", json={"model": "secret", "prompt": "Hi", "max_tokens": 6,
                                               "temperature": 0}).json()["choices"][0]["text"] == owner_answer
        assert o.post(f"/v1/jobs/{job_id}/cancel").status_code == 202


# --------------------------------------------------------------------------- keys
def test_api_keys_are_never_stored_in_clear_nor_logged(stack, peft_files):
    import psycopg

    key = stack.new_tenant("keyholder")
    r = httpx.get(f"{stack.base_url}/admin/tenants", headers=stack.admin_headers())
    tenant_id = next(t["id"] for t in r.json()["data"] if t["name"].startswith("keyholder-"))
    invalid = "pf-" + uuid.uuid4().hex + uuid.uuid4().hex[:11]
    with stack.client(key) as c:
        assert c.get("/v1/models").status_code == 200
        assert c.post("/v1/completions", json={"model": "gpt2", "prompt": "Hi", "max_tokens": 3}).status_code == 200
        with c.stream("POST", "/v1/completions", json={"model": "gpt2", "prompt": "Hi", "max_tokens": 3,
                                                       "stream": True}) as s:
            assert s.status_code == 200 and "[DONE]" in "".join(s.iter_text())
        assert c.post("/v1/adapters", data={"name": "k"}, files={"file": ("a.zip", b"junk", "application/zip")}
                      ).status_code == 400
        assert c.post("/v1/adapters", data={"name": "k"},
                      files={"file": ("a.zip", _zip(peft_files), "application/zip")}).status_code == 201
        assert c.get("/v1/adapters/nope").status_code == 404
        assert c.get(f"/v1/models?api_key={key}").status_code == 200               # a key in a query string
    rotated = httpx.post(f"{stack.base_url}/admin/tenants/{tenant_id}/rotate-key", headers=stack.admin_headers())
    assert rotated.status_code == 200, rotated.text
    new_key = rotated.json()["api_key"]
    with httpx.Client(base_url=stack.base_url) as c:
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401   # revoked
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {invalid}"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Basic {new_key}"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": new_key}).status_code == 401
        assert c.get("/admin/tenants", headers={"Authorization": f"Bearer {invalid}"}).status_code == 401

    secrets = {"key": key, "rotated": new_key, "invalid": invalid, "admin": stack.admin_key}
    needles = {name: [s, s[3:]] for name, s in secrets.items()}   # with and without the "pf-" prefix
    # the database: every row of every table, as text
    url = stack.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, connect_timeout=5) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema='public'").fetchall()]
        assert {"tenants", "api_keys", "adapter_versions", "datasets", "training_jobs"} <= set(tables)
        dump = "\n".join(row[0] for t in tables
                         for row in conn.execute(f'SELECT row_to_json(t)::text FROM "{t}" t').fetchall())
        stored = {r[0] for r in conn.execute("SELECT key_hash FROM api_keys WHERE tenant_id = %s", (tenant_id,))}
    assert hashlib.sha256(key.encode()).hexdigest() in stored          # what is stored: the hash
    assert hashlib.sha256(new_key.encode()).hexdigest() in stored
    for name, variants in needles.items():
        for needle in variants:
            assert needle not in dump, f"the {name} key is stored in clear in the database"
    # the data dir: every file, as bytes
    for path in stack.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, variants in needles.items():
                assert not any(n.encode() in data for n in variants), f"the {name} key is in {path}"
    # the server's whole log output (DEBUG), which did log these requests
    log = stack.server.log()
    assert "GET /v1/models 401" in log and "POST /v1/completions 200" in log and " DEBUG " in log
    for name, variants in needles.items():
        for needle in variants:
            assert needle not in log, f"the {name} key appears in the server log"


# --------------------------------------------------------------------------- hostile uploads
def _lying_zip(files: dict[str, bytes], name: str, declared: int) -> bytes:
    """A zip whose headers claim ``declared`` uncompressed bytes for ``name`` (a lie)."""
    data = bytearray(_zip(files))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo(name)
    struct.pack_into("<L", data, info.header_offset + 22, declared)
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        n = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46: at + 46 + n]) == name.encode():
            struct.pack_into("<L", data, at + 24, declared)
        at = data.find(b"PK\x01\x02", at + 4)
    return bytes(data)


def _zip_bomb(config: bytes, size: int) -> bytes:
    """adapter_model.safetensors = ``size`` zero bytes, deflated (~1000:1), written in chunks."""
    buf = io.BytesIO()
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", config)
        info = zipfile.ZipInfo("adapter_model.safetensors")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as fh:
            for _ in range(size >> 20):
                fh.write(chunk)
    return buf.getvalue()


def _tar_gz_bomb(config: bytes, size: int) -> bytes:
    """A tar.gz whose safetensors member is ``size`` zero bytes, gzip-compressed in chunks."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = io.BytesIO()
    head = io.BytesIO()
    with tarfile.open(fileobj=head, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(config)
        tf.addfile(info, io.BytesIO(config))
    raw = head.getvalue().rstrip(b"\0")
    raw += b"\0" * (-len(raw) % 512)
    big = tarfile.TarInfo("adapter_model.safetensors")
    big.size = size
    out.write(comp.compress(raw + big.tobuf(format=tarfile.GNU_FORMAT)))
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        out.write(comp.compress(chunk))
    out.write(comp.compress(b"\0" * 1024))
    out.write(comp.flush())
    return out.getvalue()


class _Pwn:
    """Unpickling this creates ``path``: the proof that nothing was unpickled is its absence."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"pfboundary") -> tuple[bytes, dict[str, str]]:
    """(raw part headers, body) pairs -> a multipart body and its Content-Type."""
    body = b"".join(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts)
    return body + b"--" + boundary + b"--\r\n", {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


def _raw_request(port: int, head: bytes, timeout: float = 15) -> bytes:
    """Send ``head`` (request line + headers, no body) and read what comes back until the
    server answers or closes; a hang fails the test through the socket timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_hostile_uploads_are_refused_4xx_and_store_nothing(stack, peft_files, tmp_path):
    key = stack.new_tenant("hostile")
    cfg, weights = peft_files["adapter_config.json"], peft_files["adapter_model.safetensors"]
    pwned = tmp_path / f"pwned-{uuid.uuid4().hex}"
    evil_pickle = pickle.dumps(_Pwn(str(pwned)))
    symlink_zip_info = zipfile.ZipInfo("adapter_model.safetensors")
    symlink_zip_info.create_system = 3
    symlink_zip_info.external_attr = (stat.S_IFLNK | 0o777) << 16

    archives = {
        "zip slip": _zip({"../../evil/adapter_config.json": cfg, "../../evil/adapter_model.safetensors": weights}),
        "zip slip (backslashes)": _zip({"..\\..\\adapter_config.json": cfg, "adapter_model.safetensors": weights}),
        "absolute path": _zip({"/etc/adapter_config.json": cfg, "/etc/adapter_model.safetensors": weights}),
        "tar slip": tar_gz_with({"../adapter_config.json": cfg, "../adapter_model.safetensors": weights}),
        "zip bomb (300 MiB of zeros)": _zip_bomb(cfg, 300 << 20),
        "gzip bomb (300 MiB tar)": _tar_gz_bomb(cfg, 300 << 20),
        "lying zip header": _lying_zip({"adapter_config.json": cfg, "adapter_model.safetensors": bytes(8 << 20)},
                                       "adapter_model.safetensors", 1000),
        "pickle adapter_model.bin": _zip({"adapter_config.json": cfg, "adapter_model.bin": evil_pickle}),
        "pickle beside safetensors": _zip({"adapter_config.json": cfg, "adapter_model.safetensors": weights,
                                           "optimizer.pt": evil_pickle}),
        "pickle named .safetensors": _zip({"adapter_config.json": cfg, "adapter_model.safetensors": evil_pickle}),
        "symlink in tar": tar_gz_with({"adapter_config.json": cfg},
                                  [tar_link("adapter_model.safetensors", tarfile.SYMTYPE, "/etc/passwd")]),
        "hard link in tar": tar_gz_with({"adapter_config.json": cfg},
                                    [tar_link("adapter_model.safetensors", tarfile.LNKTYPE, "/etc/passwd")]),
        "symlink in zip": _zip_infos([(zipfile.ZipInfo("adapter_config.json"), cfg),
                                      (symlink_zip_info, b"/etc/passwd")]),
        "too many members": _zip({"adapter_config.json": cfg, "adapter_model.safetensors": weights,
                                  **{f"junk/{i}.txt": b"x" for i in range(40)}}),
        "not an archive": b"MZ\x90\x00" + bytes(1000),
    }
    blobs = stack.data_dir / "blobs"

    def stored_files() -> set[Path]:
        return {p for p in stack.data_dir.rglob("*") if p.is_file() and "prefixes" not in p.parts}

    with stack.client(key, timeout=60) as c:
        before = stored_files()
        for what, archive in archives.items():
            r = c.post("/v1/adapters", data={"name": "evil"}, files={"file": ("a.zip", archive, "application/zip")})
            assert r.status_code == 400, (what, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] == "adapter_rejected" and err["type"] == "invalid_request_error", (what, err)

        # multipart abuse: an enormous file name, an enormous part header, very many part headers
        valid = _zip(peft_files)
        name_part = (b'Content-Disposition: form-data; name="name"', b"evil")
        for what, file_headers in {
            "1 MiB file name": b'Content-Disposition: form-data; name="file"; filename="' + b"A" * (1 << 20) + b'"',
            "1 MiB part header": b'Content-Disposition: form-data; name="file"; filename="a.zip"\r\nX-Junk: '
                                 + b"j" * (1 << 20),
            "20k part headers": b'Content-Disposition: form-data; name="file"; filename="a.zip"'
                                + b"".join(b"\r\nX-H%d: v" % i for i in range(20000)),
        }.items():
            body, headers = _multipart([name_part, (file_headers, valid)])
            r = c.post("/v1/adapters", content=body, headers=headers)
            assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
        # an enormous adapter name (a form field, not a file)
        body, headers = _multipart([(b'Content-Disposition: form-data; name="name"', b"n" * (2 << 20)),
                                    (b'Content-Disposition: form-data; name="file"; filename="a.zip"', valid)])
        r = c.post("/v1/adapters", content=body, headers=headers)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        # datasets: a pickle is no JSONL
        r = c.post("/v1/datasets", files={"file": ("d.jsonl", evil_pickle, "application/jsonl")})
        assert r.status_code == 400, r.text

        assert c.get("/v1/adapters").json()["data"] == []
        assert c.get("/v1/datasets").json()["data"] == []
        assert stored_files() == before, "a refused upload left a file behind"
        assert not list(blobs.rglob(".tmp-*"))
    assert not pwned.exists(), "an uploaded pickle was unpickled"

    # an enormous Content-Length and no body: refused at once, no waiting for the body
    for path in (b"/v1/adapters", b"/v1/datasets", b"/v1/completions", b"/v1/jobs", b"/admin/tenants"):
        head = (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
                + b"\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 99999999999\r\n\r\n")
        answer = _raw_request(stack.port, head)
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        assert status == 413, (path, answer[:300])
    # an enormous HTTP header: 431 (uvicorn's httptools parser takes it; our middleware refuses)
    head = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nX-Junk: " + b"h" * (1 << 20) + b"\r\n\r\n")
    answer = _raw_request(stack.port, head)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:300]
    # the server is fine afterwards, and still holds nothing of this tenant; the same
    # hand-made multipart body with sane headers is accepted (the refusals above were the sizes)
    with stack.client(key) as c:
        assert c.get("/v1/adapters").json()["data"] == []
        body, headers = _multipart([name_part[:1] + (b"fine",),
                                    (b'Content-Disposition: form-data; name="file"; filename="' + b"a" * 200
                                     + b'.zip"\r\nContent-Type: application/zip', valid)])
        r = c.post("/v1/adapters", content=body, headers=headers)
        assert r.status_code == 201 and r.json()["name"] == "fine", r.text
    log = stack.server.log()
    assert "unhandled error" not in log and "Traceback" not in log, log[-4000:]
