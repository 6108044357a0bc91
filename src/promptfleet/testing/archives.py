"""Archive builders for upload tests: members from bytes (hostile ones included: links,
devices, folders) and folders as archives. A PEFT folder as a flat zip is
``promptfleet.client.zip_directory``, what the CLI uploads."""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A deflated zip of ``files`` (member name -> bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_with(files: dict[str, bytes], special: tuple[tarfile.TarInfo, ...] | list[tarfile.TarInfo] = ()) -> bytes:
    """A tar.gz of ``files`` plus ``special`` members (links, devices: see ``tar_link``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special:
            tf.addfile(info)
    return buf.getvalue()


def tar_link(name: str, kind: bytes, target: str = "", **attrs: object) -> tarfile.TarInfo:
    """A tar member of type ``kind`` (``tarfile.SYMTYPE``, ``LNKTYPE``, ``CHRTYPE``, ...)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def dir_files(path: Path, *, folder: str | None = None) -> dict[str, bytes]:
    """The regular files of a folder as an archive's member dict (optionally under ``folder``)."""
    return {(f"{folder}/{p.name}" if folder else p.name): p.read_bytes()
            for p in sorted(path.iterdir()) if p.is_file()}


def tar_gz_dir(path: Path, folder: str = "adapter") -> bytes:
    """A tar.gz of a folder's regular files, under ``folder/``."""
    return tar_gz_with(dir_files(path, folder=folder))


def unzip_to(data: bytes, out: Path) -> Path:
    """Extract a zip's members flat into ``out`` (folders inside the zip dropped)."""
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            name = Path(info.filename).name
            if name:
                (out / name).write_bytes(zf.read(info))
    return out
