"""Every refused upload, built hostile in the test, leaves no row and no blob behind."""
from __future__ import annotations

import json
import gzip
import io
import math
import pickle
import random
import stat
import struct
import tarfile
import warnings
import zipfile
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import func, select

from promptfleet.adapters.archive import ArchiveLimits
from promptfleet.adapters.errors import AdapterRejected, InvalidAdapterName
from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.service import import_adapter
from promptfleet.db import session_scope
from promptfleet.testing.adapter_files import prompt_tuning_files
from promptfleet.testing.archives import dir_files, tar_gz_with, tar_link, zip_bytes
from promptfleet.testing.peft import make_peft_adapter

SMALL = ArchiveLimits(max_file_bytes=4 << 20, max_total_bytes=8 << 20)
ZEROS = bytes(32 << 20)  # 32 MiB of zeros: deflates to ~32 KiB


def _zip_with(files: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


def _patch_declared_size(data: bytes, name: str, size: int) -> bytes:
    """Make a zip's local header and central directory claim ``size`` uncompressed bytes."""
    out = bytearray(data)
    encoded = name.encode()
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    struct.pack_into("<L", out, info.header_offset + 22, size)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", out, at + 28)[0]
        if bytes(out[at + 46: at + 46 + name_len]) == encoded:
            struct.pack_into("<L", out, at + 24, size)
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def _symlink_zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _custom(ctx, **kw) -> bytes:
    config, weights = prompt_tuning_files(ctx.cfg, **kw)
    return zip_bytes({"adapter_config.json": json.dumps(config).encode(),
                            "adapter_model.safetensors": weights})


def _with_config(ctx, **changes) -> bytes:
    config = json.loads(ctx.files["adapter_config.json"])
    config.update(changes)
    return zip_bytes({**ctx.files, "adapter_config.json": json.dumps(config).encode()})


def _duplicate(ctx) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _zip_with(ctx.files, [(zipfile.ZipInfo("adapter_config.json"), b"{}")])


def _lora(ctx) -> bytes:
    path = make_peft_adapter(ctx.checkpoint, ctx.tmp_path / "lora", "lora")
    return zip_bytes(dir_files(path))


def _nan_values(ctx, value: float) -> bytes:
    values = torch.randn(4, ctx.cfg.n_embd)
    values[2, 5] = value
    return _custom(ctx, values=values)


CASES = {
    "zip slip ../x": (lambda c: zip_bytes({**c.files, "../x": b"owned"}), "path traversal"),
    "zip slip nested": (lambda c: zip_bytes({**c.files, "a/../../x": b"owned"}), "path traversal"),
    "tar slip": (lambda c: tar_gz_with({**c.files, "../../x": b"owned"}), "path traversal"),
    "absolute zip": (lambda c: zip_bytes({**c.files, "/etc/evil": b"owned"}), "absolute path"),
    "absolute tar": (lambda c: tar_gz_with({**c.files, "/tmp/evil": b"owned"}), "absolute path"),
    "windows drive": (lambda c: zip_bytes({**c.files, "C:\\evil": b"owned"}), "absolute path"),
    "symlink in zip": (lambda c: _zip_with({"adapter_config.json": c.files["adapter_config.json"]},
                                           [(_symlink_zip_info("adapter_model.safetensors"), b"/etc/passwd")]),
                       "symbolic link"),
    "symlink in tar": (lambda c: tar_gz_with({"adapter_config.json": c.files["adapter_config.json"]},
                                           [tar_link("adapter_model.safetensors", tarfile.SYMTYPE, "/etc/passwd")]),
                       "symbolic link"),
    "hardlink in tar": (lambda c: tar_gz_with({"adapter_config.json": c.files["adapter_config.json"]},
                                            [tar_link("adapter_model.safetensors", tarfile.LNKTYPE, "/etc/passwd")]),
                        "hard link"),
    "device in tar": (lambda c: tar_gz_with(c.files, [tar_link("null", tarfile.CHRTYPE, devmajor=1, devminor=3)]),
                      "device"),
    "fifo in tar": (lambda c: tar_gz_with(c.files, [tar_link("pipe", tarfile.FIFOTYPE)]), "device, fifo"),
    "adapter_model.bin pickle": (
        lambda c: zip_bytes({"adapter_config.json": c.files["adapter_config.json"],
                                 "adapter_model.bin": pickle.dumps({"prompt_embeddings": [1.0]})}),
        "adapter_model.bin .a pickle. is refused"),
    "extra .pt pickle": (lambda c: tar_gz_with({**c.files, "optimizer.pt": pickle.dumps([1])}),
                         "looks like a pickle"),
    "zip bomb, declared": (lambda c: zip_bytes({**c.files, "adapter_model.safetensors": ZEROS}),
                           "over the per-file limit"),
    "zip bomb, total": (lambda c: zip_bytes({**c.files, **{f"pad{i}": ZEROS[:3 << 20] for i in range(3)}}),
                        "more than 8.0 MiB"),
    "zip lying header": (lambda c: _patch_declared_size(
        zip_bytes({**c.files, "adapter_model.safetensors": ZEROS[:16 << 20]}),
        "adapter_model.safetensors", 1000), "corrupt archive member|expands beyond|declares"),
    "tar.gz bomb": (lambda c: tar_gz_with({**c.files, "adapter_model.safetensors": ZEROS}),
                    "expands to more than"),
    "too many members": (lambda c: zip_bytes({**c.files, **{f"f{i}.txt": b"x" for i in range(20)}}),
                         "more than 16 members"),
    "too many tar members": (lambda c: tar_gz_with({**c.files, **{f"f{i}": b"" for i in range(20)}}),
                             "more than 16 members"),
    "duplicate names": (_duplicate, "more than one member named"),
    "two top-level folders": (lambda c: zip_bytes({f"a/{k}": v for k, v in c.files.items()} | {"b/x": b""}),
                              "several top-level folders"),
    "missing config": (lambda c: zip_bytes({"adapter_model.safetensors": c.files["adapter_model.safetensors"]}),
                       "adapter_config.json is missing"),
    "missing weights": (lambda c: tar_gz_with({"x/adapter_config.json": c.files["adapter_config.json"]}),
                        "adapter_model.safetensors is missing from folder 'x'"),
    "nested too deep": (lambda c: zip_bytes({f"a/b/{k}": v for k, v in c.files.items()}),
                        "adapter_config.json is missing.*found at 'a/b/adapter_config.json'"),
    "malformed JSON": (lambda c: zip_bytes({**c.files, "adapter_config.json": b"{not json"}), "not valid JSON"),
    "JSON not an object": (lambda c: zip_bytes({**c.files, "adapter_config.json": b"[1, 2]"}), "JSON object"),
    "garbage safetensors": (lambda c: zip_bytes({**c.files, "adapter_model.safetensors": b"\x08" * 64}),
                            "not a valid safetensors"),
    "not an archive": (lambda c: b"hello, this is plain text and not an archive at all" * 4, "not a zip or tar.gz"),
    "png": (lambda c: b"\x89PNG\r\n\x1a\n" + bytes(100), "not a zip or tar.gz"),
    "gzip, not tar": (lambda c: gzip.compress(b"just some text" * 50), "not a tar archive"),
    "truncated zip": (lambda c: zip_bytes(c.files)[:-30], "corrupt zip"),
    "uncompressed tar": (lambda c: gzip.decompress(tar_gz_with(c.files)), "uncompressed tar"),
    "NaN embeddings": (lambda c: _nan_values(c, math.nan), "NaN or Inf"),
    "Inf embeddings": (lambda c: _nan_values(c, math.inf), "NaN or Inf"),
    "wrong width": (lambda c: _custom(c, width=128), "width 128 does not fit this backbone"),
    "wrong token_dim": (lambda c: _custom(c, token_dim=96), "token_dim=96 does not match"),
    "rows != num_virtual_tokens": (lambda c: _custom(c, n=4, num_virtual_tokens=6), "expected \\[6, dim\\]"),
    "LORA": (_lora, "unsupported peft_type 'LORA'"),
    "SEQ_CLS": (lambda c: _with_config(c, task_type="SEQ_CLS"), "unsupported task_type 'SEQ_CLS'"),
    "too large upload": (lambda c: zip_bytes({**c.files, "README.md": random.Random(0).randbytes(60_000)}),
                         "over the upload limit"),
}
LIMITS = {"too large upload": ArchiveLimits(max_archive_bytes=40_000)}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_upload_leaves_nothing(case, session_factory, storage, tenant_id, tiny_config, tiny_checkpoint,
                                       prompt_adapter_dir, tmp_path):
    build, message = CASES[case]
    ctx = SimpleNamespace(files=dir_files(prompt_adapter_dir), cfg=tiny_config,
                          checkpoint=tiny_checkpoint, tmp_path=tmp_path)
    archive = build(ctx)
    with pytest.raises(AdapterRejected, match=message):
        with session_scope(session_factory) as s:
            import_adapter(s, storage=storage, tenant_id=tenant_id, name="evil", archive=archive,
                           model_config=tiny_config, limits=LIMITS.get(case, SMALL))
    with session_scope(session_factory) as s:
        assert s.scalar(select(func.count()).select_from(AdapterVersion)) == 0
    assert [p for p in storage.root.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("name", ["", "a@1", "a/b", "../x", "-x", "x" * 65, "sp ace", "é"])
def test_invalid_adapter_names_refused(name, session_factory, storage, tenant_id, tiny_config, prompt_adapter_dir):
    archive = zip_bytes(dir_files(prompt_adapter_dir))
    with session_scope(session_factory) as s:
        with pytest.raises(InvalidAdapterName, match="invalid adapter name"):
            import_adapter(s, storage=storage, tenant_id=tenant_id, name=name, archive=archive,
                           model_config=tiny_config)
        assert s.scalar(select(func.count()).select_from(AdapterVersion)) == 0
    assert [p for p in storage.root.rglob("*") if p.is_file()] == []
