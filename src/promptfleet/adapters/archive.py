"""Safe reading of uploaded adapter archives and writing of exported ones.

An upload is a zip or a tar.gz (recognised by its magic bytes, never by its file name) of a
PEFT ``save_pretrained`` directory: ``adapter_config.json`` and
``adapter_model.safetensors``, at the archive root or inside one top-level folder. Nothing
is extracted to disk and nothing is unpickled. Refused: pickles (``.bin``, ``.pt``, ...),
absolute paths, ``..``, links and special files, duplicate names, too many members, and
anything that is (or expands to) more bytes than the limits allow.

Everything is bounded before it is parsed or inflated:

- zip: the end-of-central-directory records (the zip64 locator and record included) and
  then the central directory itself are read here, and the members counted, before
  ``zipfile`` builds its index (which costs hundreds of bytes per entry);
- tar.gz: the gzip stream is inflated on demand, never further than what the next step may
  read (a header, or a member whose declared size was checked first);
- ``adapter_model.safetensors`` may be no larger than what the adapter declared in
  ``adapter_config.json`` can need: ``num_virtual_tokens x width x 8`` bytes (float64, the
  widest float) plus a margin for the safetensors header, the width being the backbone's
  (``n_embd``, or ``n_layer * 2 * n_embd`` for PREFIX_TUNING) when the caller passes
  :class:`BackboneBounds`, and PEFT's ``token_dim``/``num_layers`` config keys otherwise;
- ``adapter_config.json`` is parsed strictly (no NaN/Infinity, no non-finite numbers); deep
  nesting, oversized integers and non-UTF-8 bytes are refusals, not crashes.
"""
from __future__ import annotations

import io
import json
import logging
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from promptfleet.adapters.generation_defaults import GENERATION_CONFIG_NAME, MAX_GENERATION_CONFIG_BYTES
from promptfleet.platform.adapter import MAX_VIRTUAL_TOKENS, PEFT_TYPES
from promptfleet.strict_json import strict_loads

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_DTYPE_BYTES = 8                 # float64, the widest float a safetensors adapter can hold
SAFETENSORS_MARGIN = 64 << 10       # the safetensors header (8-byte length + JSON) and metadata

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"
_EOCD_SIG = b"PK\x05\x06"
_EOCD = struct.Struct("<4s4H2LH")             # end of central directory record (22 bytes)
_ZIP64_LOCATOR = struct.Struct("<4sLQL")      # zip64 end of central directory locator (20 bytes)
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")     # zip64 end of central directory record (56 bytes)
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")  # one central directory entry (46 bytes + names)
_CHUNK = 1 << 16
_TAR_HEADER_BUDGET = 64 << 10       # inflated bytes a tar header may take (pax / GNU long names included)
_TAR_SLACK = 2 * tarfile.RECORDSIZE  # tarfile reads its stream a record ahead
_TAR_TRAILER_BUDGET = 1 << 20       # NUL padding after the end-of-archive blocks (large blocking factors)
_NOT_NUL = re.compile(rb"[^\0]")


class ArchiveError(ValueError):
    """An archive that is refused; the message says why."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_archive_bytes: int = 64 << 20   # the upload itself
    max_members: int = 16               # files and folders
    max_total_bytes: int = 256 << 20    # all members, uncompressed
    max_file_bytes: int = 256 << 20     # any one member, uncompressed
    max_config_bytes: int = 1 << 20     # adapter_config.json
    max_other_bytes: int = 4 << 20      # files other than the two adapter files (README.md, ...), together
    max_central_directory_bytes: int = 64 << 10  # a zip's central directory


@dataclass(frozen=True)
class BackboneBounds:
    """The widths an adapter for the serving backbone can have (any other width is refused
    later by the shape check), so its weights can be bounded before they are inflated."""

    n_embd: int
    n_layer: int
    max_virtual_tokens: int = MAX_VIRTUAL_TOKENS

    @classmethod
    def of(cls, model_config: Any) -> "BackboneBounds":
        """From a ``ModelConfig`` (``n_embd``, ``n_layer``, ``n_positions``)."""
        return cls(n_embd=int(model_config.n_embd), n_layer=int(model_config.n_layer),
                   max_virtual_tokens=max(1, min(MAX_VIRTUAL_TOKENS, int(model_config.n_positions) - 1)))

    def width(self, peft_type: str | None) -> int:
        """The width of ``prompt_embeddings``; the widest one (prefix tuning) when unknown."""
        return self.n_embd if peft_type in ("PROMPT_TUNING", "P_TUNING") else self.n_layer * 2 * self.n_embd


@dataclass(frozen=True)
class _Member:
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    read: Callable[[int], bytes]  # read(limit): at most limit+1 bytes, so overflow shows


def _mb(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1 << 10 else f"{n} bytes"


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


def _is_adapter_file(parts: tuple[str, ...], name: str) -> bool:
    """A member that may be the adapter's ``name``: at the root or inside one folder."""
    return 1 <= len(parts) <= 2 and parts[-1] == name


# --- adapter_config.json: strict JSON, and what the weights it declares can need ----------

def strict_json_loads(data: bytes, *, what: str) -> Any:
    """Parse JSON from an upload: UTF-8 only, no NaN/Infinity, no number that overflows,
    and every parser failure (deep nesting, a 5000-digit integer) an ``ArchiveError``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"{what} is not valid JSON: not UTF-8 (byte offset {exc.start})") from None
    try:
        return strict_loads(text)
    except json.JSONDecodeError as exc:
        raise ArchiveError(f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ArchiveError(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # int() over sys.get_int_max_str_digits, or the hooks above
        raise ArchiveError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _declared_width(config: dict, peft_type: str) -> int | None:
    """``prompt_embeddings``' width from the keys PEFT writes (``token_dim``, ``num_layers``)."""
    token_dim = _positive_int(config.get("token_dim"))
    if token_dim is None:
        return None
    if peft_type != "PREFIX_TUNING":
        return token_dim
    num_layers = _positive_int(config.get("num_layers"))
    return None if num_layers is None else num_layers * 2 * token_dim


def parse_config(config_bytes: bytes) -> dict:
    """``adapter_config.json`` as a dict, with a supported ``peft_type`` and a valid
    ``num_virtual_tokens`` (what bounding the weights needs); the rest is checked later."""
    config = strict_json_loads(config_bytes, what=CONFIG_NAME)
    if not isinstance(config, dict):
        raise ArchiveError(f"{CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise ArchiveError(f"unsupported peft_type {peft_type!r}; supported: {', '.join(PEFT_TYPES)}")
    n = config.get("num_virtual_tokens")
    if _positive_int(n) is None or n > MAX_VIRTUAL_TOKENS:
        raise ArchiveError(f"num_virtual_tokens must be an integer in 1..{MAX_VIRTUAL_TOKENS}, got {n!r}")
    return config


def weights_limit(config: dict | None, backbone: BackboneBounds | None, limits: ArchiveLimits) -> int:
    """The most bytes ``adapter_model.safetensors`` can need for ``config`` (a parsed config,
    or None before it is known) on ``backbone`` (None: unknown), within the file limits."""
    ceiling = min(limits.max_file_bytes, limits.max_total_bytes)
    peft_type = config["peft_type"] if config else None
    widths = [backbone.width(peft_type)] if backbone else []
    if config and (declared := _declared_width(config, peft_type)) is not None:
        widths.append(declared)
    if not widths:
        return ceiling
    rows = config["num_virtual_tokens"] if config else backbone.max_virtual_tokens  # type: ignore[union-attr]
    return min(ceiling, rows * min(widths) * MAX_DTYPE_BYTES + SAFETENSORS_MARGIN)


# --- members ------------------------------------------------------------------------------

@dataclass
class _MemberCheck:
    """The checks every member passes, one member at a time (so a tar stream is refused at
    the first bad header): count, duplicates, pickles and declared sizes. ``bound_other``: also
    bound the files besides the adapter's two (a tar stream inflates them to skip them; a zip
    never reads them)."""

    limits: ArchiveLimits
    bound_other: bool = False
    seen: set[str] = field(default_factory=set)
    count: int = 0
    total: int = 0
    other: int = 0

    def add(self, m: _Member) -> None:
        self.count += 1
        if self.count > self.limits.max_members:
            raise ArchiveError(f"archive has more than {self.limits.max_members} members")
        if not m.parts:  # the root folder entry
            return
        path = "/".join(m.parts)
        key = path.lower()
        if key in self.seen:
            raise ArchiveError(f"archive has more than one member named {path!r}")
        self.seen.add(key)
        if m.is_dir:
            return
        base = m.parts[-1].lower()
        if base == "adapter_model.bin":
            raise ArchiveError("adapter_model.bin (a pickle) is refused: save the adapter with "
                               "safe_serialization=True so it writes adapter_model.safetensors")
        if base.endswith(PICKLE_SUFFIXES):
            raise ArchiveError(f"{path!r} looks like a pickle file ({base.rsplit('.', 1)[-1]}); "
                               "pickles are never loaded, remove it from the archive")
        if m.size > self.limits.max_file_bytes:
            raise ArchiveError(f"{path!r} is {_mb(m.size)} uncompressed, over the per-file limit "
                               f"of {_mb(self.limits.max_file_bytes)}")
        self.total += m.size
        if self.total > self.limits.max_total_bytes:
            raise ArchiveError(f"archive expands to more than {_mb(self.limits.max_total_bytes)} (limit on the "
                               "total uncompressed size)")
        if self.bound_other and not (_is_adapter_file(m.parts, CONFIG_NAME)
                                     or _is_adapter_file(m.parts, WEIGHTS_NAME)):
            self.other += m.size
            if self.other > self.limits.max_other_bytes:
                raise ArchiveError(f"files other than {CONFIG_NAME} and {WEIGHTS_NAME} expand to more than "
                                   f"{_mb(self.limits.max_other_bytes)} together ({path!r} is {_mb(m.size)})")


def _locate(members: list[_Member], filename: str, root: tuple[str, ...]) -> _Member:
    files = {m.parts: m for m in members if not m.is_dir}
    found = files.get(root + (filename,))
    if found is not None:
        return found
    elsewhere = ["/".join(p) for p in files if p[-1] == filename]
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
    name = "/".join(member.parts)
    if member.size > limit:
        raise ArchiveError(f"{name!r} expands beyond {_mb(limit)}, the limit for it (its header declares "
                           f"{_mb(member.size)})")
    data = member.read(limit)
    if len(data) > limit:
        raise ArchiveError(f"{name!r} expands beyond {_mb(limit)} although its header declares "
                           f"{_mb(member.size)}")
    if len(data) != member.size:
        raise ArchiveError(f"{name!r} holds {len(data)} bytes but its header declares {member.size}")
    return data


def _check_weights_size(member: _Member, config: dict, cap: int) -> None:
    if member.size > cap:
        raise ArchiveError(
            f"{'/'.join(member.parts)!r} is {_mb(member.size)} uncompressed, but the adapter declared in "
            f"{CONFIG_NAME} ({config['peft_type']}, {config['num_virtual_tokens']} virtual tokens) can need at "
            f"most {_mb(cap)} (archive bomb?)")


# --- zip ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _CentralDirectory:
    start: int
    size: int
    declared_entries: int


def _find_eocd(data: bytes) -> int:
    """Where ``zipfile`` will take the end-of-central-directory record from (same rules)."""
    tail = len(data) - _EOCD.size
    if tail >= 0 and data[tail:tail + 4] == _EOCD_SIG and data[-2:] == b"\0\0":
        return tail
    at = data.rfind(_EOCD_SIG, max(0, len(data) - (1 << 16) - _EOCD.size))
    if at < 0 or len(data) - at < _EOCD.size:
        raise ArchiveError("corrupt zip archive: no end-of-central-directory record")
    return at


def _central_directory(data: bytes, limits: ArchiveLimits) -> _CentralDirectory:
    """The central directory ``zipfile`` will read: classic record, or the zip64 record when a
    zip64 locator precedes it (``zipfile`` assumes the record sits right before the locator)."""
    eocd_at = _find_eocd(data)
    _, _, _, entries_disk, entries, size, offset, _ = _EOCD.unpack_from(data, eocd_at)
    declared = max(entries_disk, entries)
    locator_at = eocd_at - _ZIP64_LOCATOR.size
    if locator_at >= 0 and data[locator_at:locator_at + 4] == b"PK\x06\x07":
        _, disk, _, disks = _ZIP64_LOCATOR.unpack_from(data, locator_at)
        if disk != 0 or disks > 1:
            raise ArchiveError("corrupt zip archive: it spans several disks")
        record_at = locator_at - _ZIP64_EOCD.size
        if record_at >= 0 and data[record_at:record_at + 4] == b"PK\x06\x06":
            fields = _ZIP64_EOCD.unpack_from(data, record_at)
            entries_disk64, entries64, size, offset = fields[6:10]
            declared = max(declared, entries_disk64, entries64)
            eocd_at = record_at
    if declared > limits.max_members:
        raise ArchiveError(f"archive has more than {limits.max_members} members (its end-of-central-directory "
                           f"record declares {declared})")
    if size > limits.max_central_directory_bytes:
        raise ArchiveError(f"zip central directory is {_mb(size)}, over the limit of "
                           f"{_mb(limits.max_central_directory_bytes)} (about {limits.max_members} members)")
    start = eocd_at - size
    if start < 0:
        raise ArchiveError("corrupt zip archive: bad offset for the central directory")
    return _CentralDirectory(start=start, size=size, declared_entries=declared)


def _count_central_entries(data: bytes, cd: _CentralDirectory, limits: ArchiveLimits) -> int:
    """Walk the central directory entry by entry (as ``zipfile`` will), refusing at the first
    entry past ``max_members``."""
    pos, end, count = cd.start, cd.start + cd.size, 0
    while pos < end:
        if end - pos < _CENTRAL_HEADER.size or data[pos:pos + 4] != b"PK\x01\x02":
            raise ArchiveError("corrupt zip archive: bad central directory entry")
        fields = _CENTRAL_HEADER.unpack_from(data, pos)
        pos += _CENTRAL_HEADER.size + fields[12] + fields[13] + fields[14]
        count += 1
        if count > limits.max_members:
            raise ArchiveError(f"archive has more than {limits.max_members} members")
    return count


def _zip_members(data: bytes, limits: ArchiveLimits) -> list[_Member]:
    _count_central_entries(data, _central_directory(data, limits), limits)
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
                        chunk = fh.read(min(_CHUNK, limit + 1 - len(out)))
                        if not chunk:
                            break
                        out += chunk
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                raise ArchiveError(f"corrupt archive member {info.filename!r}: {exc}") from exc
            return bytes(out)

        members.append(_Member(parts, info.is_dir(), 0 if info.is_dir() else info.file_size, read))
    check = _MemberCheck(limits)
    for m in members:
        check.add(m)
    return members


# --- tar.gz -------------------------------------------------------------------------------

class _OverBudget(Exception):
    """The gzip stream would inflate past what the current step may read."""


class _Gunzip:
    """A gzip stream inflated on demand (the file object tarfile reads), never producing more
    than ``allowance`` bytes in all: each step of the tar walk raises the allowance by what it
    may read, so a bomb is stopped within one record of the step that overflows."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._tail = b""
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self.produced = 0
        self.allowance = 0
        self.over_budget = False

    def allow(self, nbytes: int) -> None:
        self.allowance = self.produced + nbytes

    def _inflate(self, size: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < size and not self._inflater.eof:
            src = self._tail
            if not src and self._pos < len(self._data):
                src = self._data[self._pos:self._pos + _CHUNK]
                self._pos += len(src)
            try:
                out = self._inflater.decompress(src, size - got)
            except zlib.error as exc:
                raise ArchiveError(f"corrupt gzip stream: {exc}") from None
            self._tail = self._inflater.unconsumed_tail
            if not out and not src:
                raise ArchiveError("truncated gzip stream")
            parts.append(out)
            got += len(out)
        self.produced += got
        return b"".join(parts)

    def read(self, size: int = -1) -> bytes:
        size = _CHUNK if size is None or size < 0 else size
        room = self.allowance - self.produced
        if room <= 0 < size:
            if self._inflate(1):
                self.over_budget = True
                raise _OverBudget()
            return b""
        return self._inflate(min(size, room))

    def finish(self) -> None:
        """After the tar's end: only NUL padding may follow, then the end of the gzip stream."""
        self.allow(_TAR_TRAILER_BUDGET)
        while chunk := self.read(_CHUNK):
            if chunk.strip(b"\0"):
                raise ArchiveError("unexpected data after the end of the tar archive")
        if not self._inflater.eof:
            raise ArchiveError("truncated gzip stream")
        if _NOT_NUL.search(self._inflater.unused_data) or _NOT_NUL.search(self._data.obj, self._pos):
            raise ArchiveError("unexpected data after the gzip stream")


def _tar_kind_check(info: tarfile.TarInfo) -> None:
    if info.issym():
        raise ArchiveError(f"archive member {info.name!r} is a symbolic link; links are refused")
    if info.islnk():
        raise ArchiveError(f"archive member {info.name!r} is a hard link; links are refused")
    if not (info.isreg() or info.isdir()):
        raise ArchiveError(f"archive member {info.name!r} is a device, fifo or other special file")


@dataclass
class _TarScan:
    """One pass over a tar.gz: members (checked as their headers arrive), the adapter files'
    bytes read so far, and the weights bound those files allow."""

    limits: ArchiveLimits
    backbone: BackboneBounds | None
    members: list[_Member] = field(default_factory=list)
    contents: dict[tuple[str, ...], bytes] = field(default_factory=dict)
    configs: list[dict] = field(default_factory=list)
    weights_skipped: bool = False

    def weights_cap(self) -> int:
        if not self.configs:
            return weights_limit(None, self.backbone, self.limits)
        return max(weights_limit(c, self.backbone, self.limits) for c in self.configs)

    def wants(self, info: tarfile.TarInfo, parts: tuple[str, ...]) -> bool:
        """Whether to keep this member's bytes (refusing first what its header shows is too big)."""
        if not info.isreg():
            return False
        if _is_adapter_file(parts, CONFIG_NAME):
            if info.size > self.limits.max_config_bytes:
                raise ArchiveError(f"{'/'.join(parts)!r} expands beyond {_mb(self.limits.max_config_bytes)}, "
                                   f"the limit for it (its header declares {_mb(info.size)})")
            return True
        if _is_adapter_file(parts, WEIGHTS_NAME):
            cap = self.weights_cap()
            if info.size > cap:
                raise ArchiveError(f"tar.gz expands to more than {_mb(cap)}: {'/'.join(parts)!r} is "
                                   f"{_mb(info.size)} uncompressed, more than the adapter can need (archive bomb?)")
            if self.configs:
                return True
            self.weights_skipped = True  # before adapter_config.json: read it on a second pass
        return False

    def keep(self, parts: tuple[str, ...], data: bytes) -> None:
        self.contents[parts] = data
        if parts[-1] == CONFIG_NAME:
            self.configs.append(parse_config(data))


def _unread(limit: int) -> bytes:
    raise AssertionError("tar members are read while walking the stream")


def _walk_tar(data: bytes, scan: _TarScan) -> None:
    gz = _Gunzip(data)
    check = _MemberCheck(scan.limits, bound_other=True)
    try:
        gz.allow(_TAR_HEADER_BUDGET + _TAR_SLACK)
        try:
            tf = tarfile.open(fileobj=gz, mode="r|")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"a gzip file that is not a tar archive: {exc}") from exc
        unread = 0
        while True:
            gz.allow(unread + _TAR_HEADER_BUDGET + _TAR_SLACK)
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ArchiveError(f"corrupt tar archive: {exc}") from exc
            if info is None:
                break
            parts = _split_name(info.name, is_dir=info.isdir())
            _tar_kind_check(info)
            wanted = scan.wants(info, parts)  # first: a bomb's message names the adapter-derived bound
            member = _Member(parts, info.isdir(), 0 if info.isdir() else info.size, _unread)
            check.add(member)
            scan.members.append(member)
            unread = -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not wanted:
                continue
            gz.allow(unread + _TAR_SLACK)
            fh = tf.extractfile(info)
            try:
                content = fh.read(info.size + 1) if fh is not None else b""
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ArchiveError(f"corrupt archive member {info.name!r}: {exc}") from exc
            scan.keep(parts, content)
            unread = 0
        gz.finish()
    except _OverBudget:
        raise ArchiveError("tar.gz expands to more than its headers declare (archive bomb?)") from None
    except ArchiveError:
        raise
    except Exception:
        if gz.over_budget:  # tarfile wrapped our signal in its own error
            raise ArchiveError("tar.gz expands to more than its headers declare (archive bomb?)") from None
        raise


def _tar_members(data: bytes, limits: ArchiveLimits, backbone: BackboneBounds | None) -> list[_Member]:
    scan = _TarScan(limits, backbone)
    _walk_tar(data, scan)
    if scan.weights_skipped and scan.configs:
        log.debug("adapter_model.safetensors precedes adapter_config.json in the tar; reading it again")
        again = _TarScan(limits, backbone, configs=list(scan.configs))
        _walk_tar(data, again)
        scan = again
    contents = scan.contents
    return [_Member(m.parts, m.is_dir, m.size,
                    lambda limit, parts=m.parts: contents.get(parts, b"")[:limit + 1]) for m in scan.members]


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes                     # adapter_config.json
    weights: bytes                    # adapter_model.safetensors
    generation_config: bytes | None   # generation_config.json beside them, if any


def read_adapter_files(data: bytes, *, limits: ArchiveLimits, backbone: BackboneBounds | None = None) -> AdapterFiles:
    """The adapter's files from an uploaded zip or tar.gz, or ``ArchiveError`` saying what is
    wrong. ``backbone`` (the serving model's widths) bounds the weights before they are
    inflated; an optional ``generation_config.json`` beside them (decoding defaults) is
    counted with the other files."""
    if len(data) > limits.max_archive_bytes:
        raise ArchiveError(f"archive is {_mb(len(data))}, over the upload limit of {_mb(limits.max_archive_bytes)}")
    if data[:4] in _ZIP_MAGIC:
        members = _zip_members(data, limits)
    elif data[:2] == _GZIP_MAGIC:
        members = _tar_members(data, limits, backbone)
    elif len(data) > 262 and data[257:262] == b"ustar":
        raise ArchiveError("an uncompressed tar archive: upload a zip or a tar.gz")
    else:
        raise ArchiveError("not a zip or tar.gz archive (unrecognised leading bytes); upload a zip or tar.gz "
                           "of the folder written by PEFT's save_pretrained")
    root = _root(members)
    config_member = _locate(members, CONFIG_NAME, root)
    weights_member = _locate(members, WEIGHTS_NAME, root)
    config_bytes = _read_counted(config_member, min(limits.max_config_bytes, limits.max_file_bytes))
    config = parse_config(config_bytes)
    cap = weights_limit(config, backbone, limits)
    _check_weights_size(weights_member, config, cap)
    weights = _read_counted(weights_member, min(cap, limits.max_total_bytes - len(config_bytes)))
    generation = next((m for m in members if not m.is_dir and m.parts == root + (GENERATION_CONFIG_NAME,)), None)
    generation_bytes = None if generation is None else _read_counted(
        generation, min(MAX_GENERATION_CONFIG_BYTES, limits.max_other_bytes))
    return AdapterFiles(config_bytes, weights, generation_bytes)


def read_adapter_archive(data: bytes, *, limits: ArchiveLimits,
                         backbone: BackboneBounds | None = None) -> tuple[bytes, bytes]:
    """``(adapter_config.json bytes, adapter_model.safetensors bytes)``: ``read_adapter_files``
    without the optional files."""
    files = read_adapter_files(data, limits=limits, backbone=backbone)
    return files.config, files.weights


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
