"""Hostile inputs for upload tests, and how a refusal is measured.

``zip64_bomb``: a zip whose zip64 end-of-central-directory record claims far more entries
than the classic record (the adapter-archive reader must believe neither). ``measure_refusal``
runs a parser on some bytes in a fresh interpreter and reports its refusal, the wall time of
the call and the growth of the peak RSS (the kernel's high-water mark, reset just before the
call), which counts zlib's and tokenizers' native allocations that tracemalloc misses."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path


def zip64_bomb(files: dict[str, bytes], *, claimed: int = 600_000) -> bytes:
    """A zip holding ``files`` (stored) whose central directory really has ``claimed`` entries
    (1-byte names, all pointing at the first member): the zip64 end-of-central-directory
    record says so, while the classic record claims 1 entry and a small directory."""
    body, central = bytearray(), []
    for name, data in files.items():
        offset, crc, encoded = len(body), zlib.crc32(data), name.encode()
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, len(data), len(data),
                            len(encoded), 0) + encoded + data
        central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, crc, len(data), len(data),
                                   len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
    pad = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"x"
    directory = b"".join(central) + pad * (claimed - len(central))
    cd_offset = len(body)
    record_at = cd_offset + len(directory)
    zip64_record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, claimed, claimed, len(directory),
                               cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, record_at, 1)
    classic = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central[0]), 0xFFFFFFFF, 0)
    return bytes(body) + directory + zip64_record + locator + classic


_PROBE = r"""
import json, re, resource, sys, time
def _status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) << 10
{setup}
data = open(sys.argv[1], "rb").read()
import gc; gc.collect()
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (Linux >= 4.0)
    how, base = "VmHWM", _status("VmRSS")
except OSError:
    how, base = "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
start = time.perf_counter()
try:
    {call}
    refusal = None
except Exception as exc:
    refusal = [type(exc).__name__, str(exc)]
seconds = time.perf_counter() - start
peak = _status("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
print(json.dumps({{"refusal": refusal, "seconds": seconds, "growth_mib": (peak - base) / 2**20, "how": how}}))
"""

def measure_refusal(data: bytes, tmp_path: Path, *, setup: str, call: str,
                    env: dict[str, str] | None = None) -> dict:
    """Run ``setup`` then ``call`` (Python source; ``data`` holds the bytes) in a fresh
    interpreter: ``{"refusal": [type, message] or None, "seconds", "growth_mib", "how"}``."""
    path = tmp_path / "hostile.bin"
    path.write_bytes(data)
    script = _PROBE.format(setup=setup, call=call)
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
