"""Hostile adapter and dataset uploads over HTTP: each is a 400 with the OpenAI-shaped error
body, and leaves no row and no blob (the archive and dataset readers' own bounds are
measured in tests/adapters/test_archive_bounds.py and tests/trainer/test_dataset_bounds.py)."""
from __future__ import annotations

import json
import struct
import tarfile
import zlib

import pytest

from promptfleet.testing import api_error
from promptfleet.testing.archives import zip_bytes
from promptfleet.testing.hostile import zip64_bomb


def tar_gz_bomb(config: bytes, *, size: int = 256 << 20) -> bytes:
    """adapter_config.json, then adapter_model.safetensors of ``size`` zeros: ~1 KiB per MiB."""
    def header(name: str, n: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = n
        return info.tobuf(format=tarfile.USTAR_FORMAT)

    unit = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero_mib = unit.compress(bytes(1 << 20)) + unit.flush(zlib.Z_FULL_FLUSH)
    head = header("adapter_config.json", len(config)) + config + bytes(-len(config) % 512)
    head += header("adapter_model.safetensors", size)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc = zlib.crc32(head)
    for _ in range(size >> 20):
        crc = zlib.crc32(bytes(1 << 20), crc)
    crc = zlib.crc32(bytes(1024), crc)
    return b"".join([b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", deflate.compress(head),
                     deflate.flush(zlib.Z_FULL_FLUSH), zero_mib * (size >> 20), deflate.compress(bytes(1024)),
                     deflate.flush(), struct.pack("<2L", crc, (len(head) + size + 1024) & 0xFFFFFFFF)])


def _adapter_files(peft_dirs) -> dict[str, bytes]:
    folder = peft_dirs["pt"]
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def _config_with(files: dict[str, bytes], raw_value: bytes) -> bytes:
    config = json.loads(files["adapter_config.json"])
    config["token_dim"] = "@@"
    return json.dumps(config).encode().replace(b'"@@"', raw_value)


def _stored_blobs(api) -> list:
    return [p for p in api.settings.data_dir.rglob("*") if p.is_file() and "blobs" in p.parts]


def test_hostile_adapter_uploads_are_400_and_store_nothing(make_api, peft_dirs):
    api = make_api()
    _, h = api.new_tenant()
    files = _adapter_files(peft_dirs)
    hostile = {
        "zip64 EOCD claiming 600k entries": (zip64_bomb(files), "more than 16 members"),
        "tar.gz inflating to 256 MiB": (tar_gz_bomb(files["adapter_config.json"]), "more than the adapter can need"),
        "config nested 100000 deep": (zip_bytes({**files, "adapter_config.json": b"[" * 100_000}),
                                      "nested too deeply"),
        "config with a 5000-digit number": (
            zip_bytes({**files, "adapter_config.json": _config_with(files, b"9" * 5000)}),
            "Exceeds the limit (4300 digits)"),
        "config with NaN": (zip_bytes({**files, "adapter_config.json": _config_with(files, b"NaN")}),
                            "NaN is not valid JSON"),
        "config not UTF-8": (zip_bytes({**files, "adapter_config.json": b'{"peft_type": "\xff"}'}),
                             "not UTF-8"),
    }
    for case, (archive, fragment) in hostile.items():
        err = api_error(api.upload(h, "evil", archive), 400, "adapter_rejected", type="invalid_request_error")
        assert fragment in err["message"], (case, err["message"])
        assert err["message"].startswith("adapter refused: ") and err.get("param") == "file", case
    assert api.client.get("/v1/adapters", headers=h).json()["data"] == []
    assert _stored_blobs(api) == []
    # the same adapter, well formed, is accepted
    assert api.upload(h, "fine", zip_bytes(files)).status_code == 201


def _upload_dataset(api, headers, data: bytes):
    return api.client.post("/v1/datasets", files={"file": ("train.jsonl", data, "application/jsonl")},
                           headers=headers)


GOOD = json.dumps({"prompt": "2+2=", "completion": " 4"}).encode() + b"\n"


HOSTILE_DATASETS = {
    "one 8 MiB line": (b'{"prompt": "' + b"a" * (8 << 20) + b'", "completion": " x"}\n',
                       "line 1: line is 8388642 bytes (8192.03 KiB) long, over the limit of 65536 bytes (64 KiB) per line"),
    "60000 nested arrays": (GOOD + b"[" * 60_000 + b"\n", "line 2: invalid JSON: nested too deeply"),
    "5000-digit number": (GOOD + b'{"prompt": ' + b"1" * 5000 + b', "completion": " x"}\n',
                          "line 2: invalid JSON: Exceeds the limit (4300 digits)"),
    "huge float": (GOOD + b'{"prompt": 1e999, "completion": " x"}\n', "line 2: invalid JSON: number 1e999 is out of"),
    "not UTF-8": (GOOD + b'{"prompt": "\xc3\x28", "completion": " x"}\n', "line 2: not valid UTF-8"),
    "lone surrogate": (GOOD + b'{"prompt": "\\udc00", "completion": " x"}\n', "line 2: a string holds a lone"),
}


@pytest.mark.parametrize("case", list(HOSTILE_DATASETS))
def test_hostile_datasets_are_400_and_store_nothing(make_api, case):
    data, fragment = HOSTILE_DATASETS[case]
    api = make_api()
    _, h = api.new_tenant()
    err = api_error(_upload_dataset(api, h, data), 400, "invalid_dataset", type="invalid_request_error")
    assert err["message"].startswith(f"dataset refused: {fragment}"), err["message"]
    assert api.client.get("/v1/datasets", headers=h).json()["data"] == []
    assert _stored_blobs(api) == []
