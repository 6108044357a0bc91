"""A disk tier under the device cache: adapters' built KV prefixes, saved as safetensors.

A prompt-tuning prefix costs a forward pass of the backbone over the virtual tokens
(~70 ms for 20 tokens of GPT-2-small on 2 CPU cores); reading it back costs a few ms.
Entries are keyed by the adapter blob's sha256 AND the backbone's weights id and dtype
(a prompt-tuning prefix depends on the weights, not only on their shapes), written
atomically, and verified by a sha256 of their tensor bytes when read: a corrupt or
foreign file is dropped and the prefix rebuilt.

With a ``shared`` tier (``S3SharedPrefixes``, when ``PROMPTFLEET_BLOB_URL`` is ``s3://``),
a prefix built by any replica is read by every other: a local miss reads the shared copy
(checked the same way) and keeps it on local disk; a build is saved to both. The shared
tier is a cache too: when it cannot be reached, the prefix is built and served anyway.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from promptfleet.adapters.storage import SHA256_RE, StorageUnavailable
from promptfleet.platform.adapter import AdapterPrefix, AdapterWeights

log = logging.getLogger(__name__)


class SharedPrefixes(Protocol):
    """Prefix files shared by every replica, by adapter sha256 and file name (a sha256)."""

    def get(self, adapter_sha256: str, name: str) -> bytes | None: ...

    def put(self, adapter_sha256: str, name: str, data: bytes) -> None: ...


def _digest(k: torch.Tensor, v: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (k, v):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


class PrefixStore:
    def __init__(self, root: str | Path, *, weights_id: str, dtype: torch.dtype, device: torch.device | str,
                 shared: SharedPrefixes | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.weights_id = weights_id
        self.dtype = dtype
        self.device = torch.device(device)
        self.shared = shared
        self.hits = self.misses = self.corrupt = 0
        self.shared_hits = 0  # of ``hits``: read from the shared tier (built by another replica)

    def _name(self, key: str) -> str:
        return hashlib.sha256(f"{key}|{self.weights_id}|{self.dtype}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        name = self._name(key)
        return self.root / name[:2] / f"{name}.safetensors"

    def _shared_address(self, key: str) -> tuple[str, str] | None:
        """(adapter sha256, file name) in the shared tier; None for keys that name no blob."""
        adapter_sha = key.split(":", 1)[0]
        return (adapter_sha, self._name(key)) if self.shared is not None and SHA256_RE.fullmatch(adapter_sha) else None

    def _decode(self, data: bytes, key: str) -> AdapterPrefix:
        """The prefix in a file's bytes; raises when they are not this key's intact prefix."""
        tensors = st_load(data)
        k, v = tensors["k"], tensors["v"]
        meta = _read_metadata(data)
        if meta.get("key") != key or meta.get("sha256") != _digest(k, v) or k.dtype != self.dtype:
            raise ValueError("checksum or key mismatch")
        return AdapterPrefix(key=key, peft_type=meta.get("peft_type", "PROMPT_TUNING"),
                             k=k.to(self.device), v=v.to(self.device))

    def load(self, key: str) -> AdapterPrefix | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return self._load_shared(key)
        try:
            prefix = self._decode(data, key)
        except (SafetensorError, KeyError, ValueError, RuntimeError) as exc:
            self.corrupt += 1
            log.warning("dropping unreadable prefix file %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return prefix

    def _load_shared(self, key: str) -> AdapterPrefix | None:
        address = self._shared_address(key)
        data = None
        if address is not None:
            try:
                data = self.shared.get(*address)  # type: ignore[union-attr]
            except StorageUnavailable as exc:  # a cache: build it instead
                log.warning("shared prefix store unavailable; building prefix %s: %s", key, exc)
        if data is None:
            self.misses += 1
            return None
        try:
            prefix = self._decode(data, key)
        except (SafetensorError, KeyError, ValueError, RuntimeError) as exc:
            self.corrupt += 1
            self.misses += 1
            log.warning("ignoring an unreadable shared prefix for %s: %s", key, exc)
            return None
        try:
            self._write_local(key, data)
        except OSError as exc:
            log.warning("could not keep shared prefix %s on local disk: %s", key, exc)
        self.hits += 1
        self.shared_hits += 1
        return prefix

    def _encode(self, prefix: AdapterPrefix) -> bytes:
        k, v = prefix.k.detach().cpu().contiguous(), prefix.v.detach().cpu().contiguous()
        meta = {"key": prefix.key, "peft_type": prefix.peft_type, "sha256": _digest(k, v)}
        return st_save({"k": k, "v": v}, metadata=meta)

    def _write_local(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def save(self, prefix: AdapterPrefix) -> None:
        """Write the prefix to local disk (``OSError`` on failure) and, best effort, to the shared tier."""
        data = self._encode(prefix)
        try:
            self._write_local(prefix.key, data)
        finally:
            address = self._shared_address(prefix.key)
            if address is not None:
                try:
                    self.shared.put(*address, data)  # type: ignore[union-attr]
                except StorageUnavailable as exc:
                    log.warning("could not share prefix %s: %s", prefix.key, exc)

    def builder(self, build: Callable[[AdapterWeights, str], AdapterPrefix], *, check_stored: bool = True
                ) -> Callable[[AdapterWeights, str], AdapterPrefix]:
        """Wrap the engine's prefix build: read the stored prefix (unless the caller looked
        already: ``check_stored=False``), or build and store it."""
        def build_or_load(weights: AdapterWeights, key: str) -> AdapterPrefix:
            if check_stored and (stored := self.load(key)) is not None:
                return stored
            prefix = build(weights, key)
            try:
                self.save(prefix)
            except OSError as exc:  # a full disk must not fail the request
                log.warning("could not store prefix %s: %s", key, exc)
            return prefix
        return build_or_load


def _read_metadata(data: bytes) -> dict[str, str]:
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}
