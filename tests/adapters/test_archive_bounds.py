"""Adapter archives are bounded before they are parsed or inflated.

Hostile uploads are built here: a zip whose zip64 end-of-central-directory record claims
600k entries (the classic record claims 1), gzip bombs in a tar.gz (the weights, a README, a
pax header), and adapter_config.json files that break JSON parsers. Each refusal is measured
in a fresh subprocess -- wall time of the call, and growth of the peak RSS (the kernel's
high-water mark, reset just before the call), which counts zlib's and tokenizers' native
allocations that tracemalloc misses -- and must take < 1 s and < 64 MiB.
"""
from __future__ import annotations

import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from sqlalchemy import func, select

from promptfleet.adapters.archive import ArchiveError, ArchiveLimits, BackboneBounds, read_adapter_archive
from promptfleet.adapters.errors import AdapterRejected
from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.service import import_adapter, load_adapter_weights
from promptfleet.db import session_scope
from promptfleet.testing.archives import tar_gz_with, zip_bytes
from promptfleet.testing.hostile import measure_refusal, zip64_bomb
from promptfleet.testing.peft import make_peft_adapter

MAX_SECONDS = 1.0
MAX_GROWTH_MIB = 64.0
BOMB_BYTES = 256 << 20


# --- hostile archive builders ------------------------------------------------------------

def _tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def gzip_pieces(pieces: list[bytes | int]) -> bytes:
    """A gzip stream of ``pieces`` (bytes, or an int: that many zero bytes), built without
    compressing the zeros one by one: after a full flush, each MiB of zeros deflates to the
    same bytes, so one compressed MiB is repeated (~1 KiB per MiB, like ``gzip -9``)."""
    unit = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero_mib = unit.compress(bytes(1 << 20)) + unit.flush(zlib.Z_FULL_FLUSH)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    out, crc, total = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"], 0, 0
    zero_crc = zlib.crc32(bytes(1 << 20))
    for piece in pieces:
        if isinstance(piece, int):
            mib, rest = divmod(piece, 1 << 20)
            out.append(deflate.flush(zlib.Z_FULL_FLUSH) + zero_mib * mib)
            for _ in range(mib):
                crc = zlib.crc32(bytes(1 << 20), crc) if crc else zero_crc
            piece = bytes(rest)
            total += mib << 20
        out.append(deflate.compress(piece) + deflate.flush(zlib.Z_FULL_FLUSH))
        crc = zlib.crc32(piece, crc)
        total += len(piece)
    out.append(deflate.flush() + struct.pack("<2L", crc, total & 0xFFFFFFFF))
    return b"".join(out)


def tar_gz_bomb(config: bytes, *, bomb_name: str = "adapter_model.safetensors", bomb_first: bool = False,
                size: int = BOMB_BYTES, weights: bytes | None = None) -> bytes:
    """A tar.gz with adapter_config.json and a member ``bomb_name`` of ``size`` zero bytes."""
    config_part: list[bytes | int] = [_tar_header("adapter_config.json", len(config)) + _padded(config)]
    bomb_part: list[bytes | int] = [_tar_header(bomb_name, size), size + (-size % tarfile.BLOCKSIZE)]
    extra: list[bytes | int] = []
    if weights is not None:
        extra = [_tar_header("adapter_model.safetensors", len(weights)) + _padded(weights)]
    parts = bomb_part + config_part if bomb_first else config_part + bomb_part
    return gzip_pieces(parts + extra + [2 * tarfile.BLOCKSIZE])


def pax_header_bomb(config: bytes, weights: bytes, *, size: int = BOMB_BYTES) -> bytes:
    """A tar.gz whose pax extended header is ``size`` bytes (tarfile reads it whole)."""
    return gzip_pieces([_tar_header("adapter_config.json", len(config)) + _padded(config),
                        _tar_header("././@PaxHeader", size, tarfile.XHDTYPE), size,
                        _tar_header("adapter_model.safetensors", len(weights)) + _padded(weights),
                        2 * tarfile.BLOCKSIZE])


# --- measuring a refusal in a fresh process (promptfleet.testing.hostile) ----------------

ARCHIVE_SETUP = """
from promptfleet.adapters.archive import ArchiveLimits, BackboneBounds, read_adapter_archive
backbone = BackboneBounds(n_embd={n_embd}, n_layer={n_layer})
"""
ARCHIVE_CALL = "read_adapter_archive(data, limits=ArchiveLimits(), backbone=backbone)"



def assert_bounded_refusal(result: dict, error: str, fragment: str) -> None:
    assert result["refusal"] is not None, "the hostile input was accepted"
    kind, message = result["refusal"]
    assert kind == error and fragment in message, result["refusal"]
    assert result["seconds"] < MAX_SECONDS, f"refusal took {result['seconds']:.2f} s: {message}"
    assert result["growth_mib"] < MAX_GROWTH_MIB, f"peak RSS grew {result['growth_mib']:.1f} MiB: {message}"


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_files(prompt_adapter_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(prompt_adapter_dir.iterdir())
            if p.name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def archive_setup(tiny_config) -> str:
    return ARCHIVE_SETUP.format(n_embd=tiny_config.n_embd, n_layer=tiny_config.n_layer)


def _bomb(name: str, files: dict[str, bytes]) -> bytes:
    config, weights = files["adapter_config.json"], files["adapter_model.safetensors"]
    builders = {
        "zip64 EOCD claims 600k entries": lambda: zip64_bomb(files),
        "tar.gz bomb: weights after config": lambda: tar_gz_bomb(config),
        "tar.gz bomb: weights before config": lambda: tar_gz_bomb(config, bomb_first=True),
        "tar.gz bomb: README.md": lambda: tar_gz_bomb(config, bomb_name="README.md", weights=weights,
                                                      size=200 << 20),  # under the 256 MiB total limit
        "tar.gz bomb: pax header": lambda: pax_header_bomb(config, weights),
    }
    return builders[name]()


BOMBS = {
    "zip64 EOCD claims 600k entries": "more than 16 members",
    "tar.gz bomb: weights after config": "more than the adapter can need",
    "tar.gz bomb: weights before config": "more than the adapter can need",
    "tar.gz bomb: README.md": "files other than",
    "tar.gz bomb: pax header": "expands to more than its headers declare",
}


# --- the measured refusals ------------------------------------------------------------------

def test_hostile_inputs_are_what_they_claim(adapter_files):
    """The builders make what the colleague measured: 27 MiB / 600k entries, 255 KiB -> 256 MiB."""
    zipped = zip64_bomb(adapter_files)
    assert 26 << 20 < len(zipped) < 28 << 20
    record = zipped.rfind(b"PK\x06\x06")
    assert struct.unpack_from("<Q", zipped, record + 32)[0] == 600_000
    assert struct.unpack_from("<H", zipped, len(zipped) - 12)[0] == 1  # the classic record claims 1 entry
    bomb = tar_gz_bomb(adapter_files["adapter_config.json"])
    assert len(bomb) < 300 << 10
    inflater = zlib.decompressobj(wbits=31)
    head = inflater.decompress(bomb, 4096)
    assert head[:19] == b"adapter_config.json"
    total = len(head)
    while not inflater.eof:
        total += len(inflater.decompress(inflater.unconsumed_tail, 64 << 20))
    assert total >= BOMB_BYTES and inflater.unused_data == b""


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_fast_and_small(name, adapter_files, archive_setup, tmp_path):
    result = measure_refusal(_bomb(name, adapter_files), tmp_path, setup=archive_setup, call=ARCHIVE_CALL)
    assert_bounded_refusal(result, "ArchiveError", BOMBS[name])


def test_zip64_directory_larger_than_its_count_is_refused(adapter_files):
    data = bytearray(zip64_bomb(adapter_files, claimed=5000))
    record = data.rfind(b"PK\x06\x06")
    struct.pack_into("<2Q", data, record + 24, 2, 2)  # the zip64 record now claims 2 entries
    with pytest.raises(ArchiveError, match="central directory is .* over the limit"):
        read_adapter_archive(bytes(data), limits=ArchiveLimits())


def test_central_directory_is_walked_not_trusted(adapter_files):
    """Entry counts that understate the directory: the walk counts the real entries."""
    data = bytearray(zip64_bomb(adapter_files, claimed=40))
    record = data.rfind(b"PK\x06\x06")
    struct.pack_into("<2Q", data, record + 24, 2, 2)
    with pytest.raises(ArchiveError, match="more than 16 members"):
        read_adapter_archive(bytes(data), limits=ArchiveLimits())


def test_weights_are_bounded_by_the_declared_adapter(adapter_files, tiny_config):
    """5 virtual tokens x 64 wide x 8 bytes + 64 KiB: 100 KiB of weights is already too much."""
    config = json.loads(adapter_files["adapter_config.json"])
    fat = {**adapter_files, "adapter_model.safetensors": bytes(100 << 10)}
    backbone = BackboneBounds.of(tiny_config)
    for archive in (zip_bytes(fat), tar_gz_with(fat)):
        with pytest.raises(ArchiveError, match=r"can need|more than the adapter can need"):
            read_adapter_archive(archive, limits=ArchiveLimits(), backbone=backbone)
    # without the backbone, PEFT's token_dim / num_layers config keys bound it the same way
    assert config["token_dim"] == tiny_config.n_embd
    with pytest.raises(ArchiveError, match="can need"):
        read_adapter_archive(zip_bytes(fat), limits=ArchiveLimits())


def _config_with(adapter_files: dict[str, bytes], raw_value: bytes) -> bytes:
    config = json.loads(adapter_files["adapter_config.json"])
    config["token_dim"] = "@@"
    return json.dumps(config).encode().replace(b'"@@"', raw_value)


HOSTILE_CONFIGS = {
    "100000 nested arrays": (lambda f: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "5000-digit integer": (lambda f: _config_with(f, b"9" * 5000), "Exceeds the limit (4300 digits)"),
    "huge float": (lambda f: _config_with(f, b"1e999999"), "out of range"),
    "NaN": (lambda f: _config_with(f, b"NaN"), "NaN is not valid JSON"),
    "-Infinity": (lambda f: _config_with(f, b"-Infinity"), "-Infinity is not valid JSON"),
    "not UTF-8": (lambda f: f["adapter_config.json"].replace(b"PROMPT_TUNING", b"PROMPT\xff\xfeTUNING"), "not UTF-8"),
    "num_virtual_tokens absurd": (
        lambda f: f["adapter_config.json"].replace(b'"num_virtual_tokens": 5', b'"num_virtual_tokens": 10000000'),
        "num_virtual_tokens must be an integer in 1..512"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_hostile_config_json_is_a_clear_refusal(case, fmt, adapter_files, tiny_config):
    build, fragment = HOSTILE_CONFIGS[case]
    config = build(adapter_files)
    assert config != adapter_files["adapter_config.json"]
    files = {**adapter_files, "adapter_config.json": config}
    archive = (zip_bytes if fmt == "zip" else tar_gz_with)(files)
    with pytest.raises(ArchiveError) as info:
        read_adapter_archive(archive, limits=ArchiveLimits(), backbone=BackboneBounds.of(tiny_config))
    assert fragment in str(info.value) and "adapter_config.json" in str(info.value) or "num_virtual" in fragment


def test_hostile_config_through_the_service_leaves_nothing(adapter_files, session_factory, storage, tenant_id,
                                                           tiny_config, tmp_path):
    for case, (build, fragment) in HOSTILE_CONFIGS.items():
        archive = zip_bytes({**adapter_files, "adapter_config.json": build(adapter_files)})
        with pytest.raises(AdapterRejected, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            with session_scope(session_factory) as s:
                import_adapter(s, storage=storage, tenant_id=tenant_id, name="evil", archive=archive,
                               model_config=tiny_config)
    bomb = tar_gz_bomb(adapter_files["adapter_config.json"])
    with pytest.raises(AdapterRejected, match="more than the adapter can need"):
        with session_scope(session_factory) as s:
            import_adapter(s, storage=storage, tenant_id=tenant_id, name="evil", archive=bomb,
                           model_config=tiny_config)
    with session_scope(session_factory) as s:
        assert s.scalar(select(func.count()).select_from(AdapterVersion)) == 0
    assert [p for p in storage.root.rglob("*") if p.is_file()] == []


# --- legitimate adapters still pass ---------------------------------------------------------

def _tar_gz_ordered(files: dict[str, bytes], first: str) -> bytes:
    """A tar.gz with ``first`` as its first member (tar order follows the directory listing)."""
    ordered = {first: files[first], **{k: v for k, v in files.items() if k != first}}
    return gzip_pieces([b"".join(_tar_header(k, len(v)) + _padded(v) for k, v in ordered.items()),
                        2 * tarfile.BLOCKSIZE])


@pytest.fixture(scope="module")
def peft_made(tiny_checkpoint, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Adapters written by PEFT's save_pretrained (with its README.md) for the tiny backbone."""

    root = tmp_path_factory.mktemp("peft-bounds")
    made = {}
    for method in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        folder = make_peft_adapter(tiny_checkpoint, root / method, method, 7, 3)
        made[method] = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    return made


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_peft_made_adapters_still_import(method, peft_made, session_factory, storage, tenant_id, tiny_config):
    files = peft_made[method]
    assert "README.md" in files  # PEFT's model card rides along and is allowed
    archives = {"zip": zip_bytes(files), "tar.gz": tar_gz_with(files),
                "tar.gz, weights first": _tar_gz_ordered(files, "adapter_model.safetensors"),
                "tar.gz, in a folder": tar_gz_with({f"my-adapter/{k}": v for k, v in files.items()})}
    for i, (kind, archive) in enumerate(archives.items()):
        config, weights = read_adapter_archive(archive, limits=ArchiveLimits(),
                                               backbone=BackboneBounds.of(tiny_config))
        assert (config, weights) == (files["adapter_config.json"], files["adapter_model.safetensors"]), kind
        with session_scope(session_factory) as s:
            row = import_adapter(s, storage=storage, tenant_id=tenant_id, name=f"{method}-{i}", archive=archive,
                                 model_config=tiny_config)
            assert row.num_virtual_tokens == 7
        loaded = load_adapter_weights(storage=storage, version=row)
        assert loaded.prompt_embeddings.shape[0] == 7


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_trainer_made_adapters_still_import(method, tiny_checkpoint, session_factory, storage, tenant_id,
                                            tiny_config):
    """What the trainer registers (its own export), stored, loaded back, and re-uploaded as
    the zip a user downloads."""
    from promptfleet.adapters.service import export_adapter as download, register_adapter
    from promptfleet.trainer.train import TrainConfig, build_model, export_adapter

    config, weights = export_adapter(build_model(TrainConfig(model_path=str(tiny_checkpoint), method=method,
                                                             num_virtual_tokens=6)))
    with session_scope(session_factory) as s:
        row = register_adapter(s, storage=storage, tenant_id=tenant_id, name="trained", config=config,
                               safetensors_bytes=weights, model_config=tiny_config)
    assert load_adapter_weights(storage=storage, version=row).num_virtual_tokens == 6
    with session_scope(session_factory) as s:
        archive = download(s, storage=storage, tenant_id=tenant_id, ref="trained")
        again = import_adapter(s, storage=storage, tenant_id=tenant_id, name="reuploaded", archive=archive,
                               model_config=tiny_config)
        assert again.sha256 == row.sha256
