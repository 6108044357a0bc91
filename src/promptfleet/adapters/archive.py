"""Safe reading of uploaded adapter archives and writing of exported ones.

An upload is a zip or a tar.gz (recognised by its magic bytes, never by its file name) of a
PEFT ``save_pretrained`` directory: ``adapter_config.json`` and
``adapter_model.safetensors``, at the archive root or inside one top-level folder. Nothing
is extracted to disk and nothing is unpickled. Refused: pickles (``.bin``, ``.pt``, ...),
absolute paths, ``..``, links and special files, duplicate names, too many members, and
anything that is (or expands to) more bytes than the limits allow -- declared sizes are
checked up front and the bytes actually decompressed are counted while reading.
"""
from __future__ import annotations

import io
import json
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_CHUNK = 1 << 16


class ArchiveError(ValueError):
    """An archive that is refused; the message says why."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_archive_bytes: int = 64 << 20   # the upload itself
    max_members: int = 16               # files and folders
    max_total_bytes: int = 256 << 20    # all members, uncompressed
    max_file_bytes: int = 256 << 20     # any one member, uncompressed
    max_config_bytes: int = 1 << 20     # adapter_config.json


@dataclass(frozen=True)
class _Member:
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    read: Callable[[int], bytes]  # read(limit): at most limit+1 bytes, so overflow shows


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _split_name(name: str, *, is_dir: bool = False) -> tuple[str, ...]:
    if not name or any(ord(c) < 32 for c in name):
        raise ArchiveError(f"archive member name {name!r} is empty or contains control characters")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":" and norm[0].isalpha()):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive member {name!r} has a '..' path component (path traversal)")
    if not parts and not is_dir:  # "./" (the root folder itself, as `tar -C dir .` writes it) is fine
        raise ArchiveError(f"archive member name {name!r} names no file")
    return parts


def _check_members(members: list[_Member], limits: ArchiveLimits) -> None:
    if len(members) > limits.max_members:
        raise ArchiveError(f"archive has more than {limits.max_members} members")
    seen: set[str] = set()
    total = 0
    for m in members:
        if not m.parts:  # the root folder entry
            continue
        path = "/".join(m.parts)
        key = path.lower()
        if key in seen:
            raise ArchiveError(f"archive has more than one member named {path!r}")
        seen.add(key)
        if m.is_dir:
            continue
        base = m.parts[-1].lower()
        if base == "adapter_model.bin":
            raise ArchiveError("adapter_model.bin (a pickle) is refused: save the adapter with "
                               "safe_serialization=True so it writes adapter_model.safetensors")
        if base.endswith(PICKLE_SUFFIXES):
            raise ArchiveError(f"{path!r} looks like a pickle file ({base.rsplit('.', 1)[-1]}); "
                               "pickles are never loaded, remove it from the archive")
        if m.size > limits.max_file_bytes:
            raise ArchiveError(f"{path!r} is {_mb(m.size)} uncompressed, over the per-file limit "
                               f"of {_mb(limits.max_file_bytes)}")
        total += m.size
        if total > limits.max_total_bytes:
            raise ArchiveError(f"archive expands to more than {_mb(limits.max_total_bytes)} (limit on the "
                               "total uncompressed size)")


def _locate(members: list[_Member], filename: str, root: tuple[str, ...]) -> _Member:
    files = {m.parts: m for m in members if not m.is_dir}
    found = files.get(root + (filename,))
    if found is not None:
        return found
    elsewhere = [ "/".join(p) for p in files if p[-1] == filename]
    where = f"folder {root[0]!r}" if root else "the archive root"
    hint = f" (found at {elsewhere[0]!r}: files must be at the root or inside one top-level folder)" \
        if elsewhere else ""
    raise ArchiveError(f"{filename} is missing from {where}{hint}; upload the folder written by "
                       "PEFT's save_pretrained")


def _root(members: list[_Member]) -> tuple[str, ...]:
    files = [m.parts for m in members if not m.is_dir]
    if not files:
        raise ArchiveError(f"archive holds no files; expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    if any(len(p) == 1 for p in files):
        return ()
    tops = sorted({p[0] for p in files})
    if len(tops) > 1:
        raise ArchiveError(f"archive has several top-level folders ({', '.join(tops[:4])}); put the adapter "
                           "files at the root or inside one folder")
    return (tops[0],)


def _read_counted(member: _Member, limit: int) -> bytes:
    data = member.read(limit)
    name = "/".join(member.parts)
    if len(data) > limit:
        raise ArchiveError(f"{name!r} expands beyond {_mb(limit)} although its header declares "
                           f"{_mb(member.size)}")
    if len(data) != member.size:
        raise ArchiveError(f"{name!r} holds {len(data)} bytes but its header declares {member.size}")
    return data


def _zip_members(data: bytes, limits: ArchiveLimits) -> list[_Member]:
    # Check the central directory's declared size and count before zipfile parses it.
    eocd_at = data.rfind(b"PK\x05\x06", max(0, len(data) - (1 << 16) - _EOCD.size))
    if eocd_at < 0 or len(data) - eocd_at < _EOCD.size:
        raise ArchiveError("corrupt zip archive: no end-of-central-directory record")
    _, _, _, _, count, cd_size, _, _ = _EOCD.unpack_from(data, eocd_at)
    if count > limits.max_members or cd_size > limits.max_members * 4096:
        raise ArchiveError(f"archive has more than {limits.max_members} members")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise ArchiveError(f"corrupt zip archive: {exc}") from exc
    if len(infos) > limits.max_members:
        raise ArchiveError(f"archive has more than {limits.max_members} members")
    members = []
    for info in infos:
        parts = _split_name(info.filename, is_dir=info.is_dir())
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise ArchiveError(f"archive member {info.filename!r} is a symbolic link; links are refused")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"archive member {info.filename!r} is a special file (mode {oct(kind)})")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"archive member {info.filename!r} is encrypted")

        def read(limit: int, info: zipfile.ZipInfo = info) -> bytes:
            out = bytearray()
            try:
                with zf.open(info) as fh:
                    while len(out) <= limit:
                        chunk = fh.read(_CHUNK)
                        if not chunk:
                            break
                        out += chunk
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                raise ArchiveError(f"corrupt archive member {info.filename!r}: {exc}") from exc
            return bytes(out)

        members.append(_Member(parts, info.is_dir(), 0 if info.is_dir() else info.file_size, read))
    return members


def _gunzip_bounded(data: bytes, cap: int) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, cap + 1)
    except zlib.error as exc:
        raise ArchiveError(f"corrupt gzip stream: {exc}") from exc
    if len(out) > cap or d.unconsumed_tail:
        raise ArchiveError(f"tar.gz expands to more than {_mb(cap)} (archive bomb?)")
    if not d.eof:
        raise ArchiveError("truncated gzip stream")
    if d.unused_data.strip(b"\0"):
        raise ArchiveError("unexpected data after the gzip stream")
    return out


def _tar_members(data: bytes, limits: ArchiveLimits) -> list[_Member]:
    # Decompress with a hard cap first: tarfile itself reads pax/GNU long-name headers whole.
    raw = _gunzip_bounded(data, limits.max_total_bytes + (limits.max_members + 1) * 4096 + 20480)
    try:
        tf = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"a gzip file that is not a tar archive: {exc}") from exc
    members = []
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"corrupt tar archive: {exc}") from exc
        if info is None:
            break
        if len(members) >= limits.max_members:
            raise ArchiveError(f"archive has more than {limits.max_members} members")
        parts = _split_name(info.name, is_dir=info.isdir())
        if info.issym():
            raise ArchiveError(f"archive member {info.name!r} is a symbolic link; links are refused")
        if info.islnk():
            raise ArchiveError(f"archive member {info.name!r} is a hard link; links are refused")
        if not (info.isreg() or info.isdir()):
            raise ArchiveError(f"archive member {info.name!r} is a device, fifo or other special file")

        def read(limit: int, info: tarfile.TarInfo = info) -> bytes:
            fh = tf.extractfile(info)
            try:
                return fh.read(limit + 1) if fh is not None else b""
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ArchiveError(f"corrupt archive member {info.name!r}: {exc}") from exc

        members.append(_Member(parts, info.isdir(), 0 if info.isdir() else info.size, read))
    return members


def read_adapter_archive(data: bytes, *, limits: ArchiveLimits) -> tuple[bytes, bytes]:
    """Return ``(adapter_config.json bytes, adapter_model.safetensors bytes)`` from an
    uploaded zip or tar.gz, or raise ``ArchiveError`` saying what is wrong."""
    if len(data) > limits.max_archive_bytes:
        raise ArchiveError(f"archive is {_mb(len(data))}, over the upload limit of {_mb(limits.max_archive_bytes)}")
    if data[:4] in _ZIP_MAGIC:
        members = _zip_members(data, limits)
    elif data[:2] == _GZIP_MAGIC:
        members = _tar_members(data, limits)
    elif len(data) > 262 and data[257:262] == b"ustar":
        raise ArchiveError("an uncompressed tar archive: upload a zip or a tar.gz")
    else:
        raise ArchiveError("not a zip or tar.gz archive (unrecognised leading bytes); upload a zip or tar.gz "
                           "of the folder written by PEFT's save_pretrained")
    _check_members(members, limits)
    root = _root(members)
    config_member = _locate(members, CONFIG_NAME, root)
    weights_member = _locate(members, WEIGHTS_NAME, root)
    config = _read_counted(config_member, min(limits.max_config_bytes, limits.max_file_bytes))
    weights = _read_counted(weights_member, min(limits.max_file_bytes, limits.max_total_bytes - len(config)))
    return config, weights


def _zip_entry(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = compress
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def write_adapter_zip(config: dict | bytes, safetensors_bytes: bytes) -> bytes:
    """A deterministic zip of a PEFT adapter folder (same input, same bytes, same sha256):
    extract it and ``PeftModel.from_pretrained`` loads it."""
    if isinstance(config, dict):
        config = json.dumps(config, indent=2, sort_keys=True).encode("utf-8")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(_zip_entry(CONFIG_NAME, zipfile.ZIP_DEFLATED), config)
        # float weights barely compress; storing them keeps loads fast.
        zf.writestr(_zip_entry(WEIGHTS_NAME, zipfile.ZIP_STORED), safetensors_bytes)
    return buf.getvalue()
