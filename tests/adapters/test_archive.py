"""The archive reader on accepted layouts, and the export writer (no database)."""
from __future__ import annotations

import io
import json
import zipfile

import pytest

from promptfleet.adapters.archive import ArchiveError, ArchiveLimits, read_adapter_archive, write_adapter_zip
from promptfleet.platform.adapter import parse_adapter_files
from promptfleet.testing.archives import dir_files, tar_gz_with, zip_bytes


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
@pytest.mark.parametrize("folder", [None, "my-adapter"])
def test_accepts_peft_folder_at_root_or_in_one_folder(prompt_adapter_dir, fmt, folder):
    files = dir_files(prompt_adapter_dir, folder=folder)
    if folder:  # with an explicit directory entry, as `zip -r` writes it
        files = {f"{folder}/": b"", **files} if fmt == "zip" else files
    archive = (zip_bytes if fmt == "zip" else tar_gz_with)(files)
    config, weights = read_adapter_archive(archive, limits=ArchiveLimits())
    assert config == (prompt_adapter_dir / "adapter_config.json").read_bytes()
    assert weights == (prompt_adapter_dir / "adapter_model.safetensors").read_bytes()


def test_detects_format_by_magic_not_name(prompt_adapter_dir, tmp_path):
    archive = tar_gz_with(dir_files(prompt_adapter_dir))
    (tmp_path / "upload.zip").write_bytes(archive)  # a misleading name changes nothing
    config, _ = read_adapter_archive((tmp_path / "upload.zip").read_bytes(), limits=ArchiveLimits())
    assert json.loads(config)["peft_type"] == "PROMPT_TUNING"


def test_config_size_limit(prompt_adapter_dir):
    files = dir_files(prompt_adapter_dir)
    files["adapter_config.json"] = json.dumps({"pad": "x" * 5000, **json.loads(files["adapter_config.json"])}).encode()
    with pytest.raises(ArchiveError, match="expands beyond"):
        read_adapter_archive(zip_bytes(files), limits=ArchiveLimits(max_config_bytes=1000))


def test_encrypted_zip_member_refused(prompt_adapter_dir):
    data = bytearray(zip_bytes(dir_files(prompt_adapter_dir)))
    at = data.find(b"PK\x01\x02")
    data[at + 8] |= 0x1  # central directory: general purpose flag bit 0 (encrypted)
    with pytest.raises(ArchiveError, match="encrypted"):
        read_adapter_archive(bytes(data), limits=ArchiveLimits())


def test_central_directory_count_checked_before_parsing():
    files = {f"f{i}": b"" for i in range(40)}
    with pytest.raises(ArchiveError, match="more than 16 members"):
        read_adapter_archive(zip_bytes(files), limits=ArchiveLimits())


def test_write_adapter_zip_is_deterministic_and_readable(prompt_adapter_dir):
    config = json.loads((prompt_adapter_dir / "adapter_config.json").read_bytes())
    weights = (prompt_adapter_dir / "adapter_model.safetensors").read_bytes()
    first = write_adapter_zip(config, weights)
    assert first == write_adapter_zip(dict(reversed(list(config.items()))), weights)
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    config_bytes, weights_back = read_adapter_archive(first, limits=ArchiveLimits())
    assert weights_back == weights and json.loads(config_bytes) == config
    parsed = parse_adapter_files(config_bytes, weights_back)
    assert parsed.peft_type == "PROMPT_TUNING" and parsed.num_virtual_tokens == 5


def test_tar_of_dot_with_root_entry(prompt_adapter_dir):
    """``tar czf a.tgz -C dir .`` writes a "." entry and "./name" members."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(prompt_adapter_dir, arcname=".")
    names = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames()
    assert "." in names and "./adapter_config.json" in names
    config, weights = read_adapter_archive(buf.getvalue(), limits=ArchiveLimits())
    assert weights == (prompt_adapter_dir / "adapter_model.safetensors").read_bytes()
