"""Hand-crafting state files for tests: a changed header under a valid checksum."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path


def forge(path: Path, change) -> None:
    """Rewrite a state file's header with `change` applied and a valid checksum (a hand-crafted file)."""
    data = path.read_bytes()[:-32]
    (n,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    change(header)
    head = json.dumps(header, sort_keys=True).encode()
    body = data[:8] + struct.pack("<I", len(head)) + head + data[12 + n :]
    path.write_bytes(body + hashlib.sha256(body).digest())


def forge_header(path: Path, head: bytes) -> None:
    """Replace a state file's header with raw bytes (JSON no encoder writes) under a valid checksum."""
    data = path.read_bytes()[:-32]
    (n,) = struct.unpack("<I", data[8:12])
    body = data[:8] + struct.pack("<I", len(head)) + head + data[12 + n :]
    path.write_bytes(body + hashlib.sha256(body).digest())


def header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<I", data[8:12])
    return json.loads(data[12 : 12 + n])
