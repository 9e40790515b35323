"""Saving and loading one stream's state: a few KB whatever the conversation's length.

File layout: MAGIC (8 bytes) | header length (u32 LE) | header (JSON) | arrays (raw, in header
order) | sha256 of everything before it (32 bytes). The header names the model (its source
checkpoint's sha256) and each array's name, dtype and shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"LMNSTATE"
VERSION = 1


class StateFileError(Exception):
    """A state file that cannot be loaded (truncated, corrupt, other model); nothing was loaded."""


def save_state(path: Path | str, arrays: dict[str, np.ndarray], meta: dict) -> int:
    """Write atomically (temp file + rename); returns the file size in bytes."""
    header = {"version": VERSION, **meta,
              "arrays": [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in arrays.items()]}
    head = json.dumps(header, sort_keys=True).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())
    data = body + hashlib.sha256(body).digest()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def load_state(path: Path | str, expect: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a state file; `expect` holds header fields that must match (e.g. model)."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"no state file at {path}")
    data = path.read_bytes()
    if len(data) < len(MAGIC) + 4 + 32 or not data.startswith(MAGIC):
        raise StateFileError(f"{path} is not an lmn state file")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise StateFileError(f"{path} is truncated or corrupt (checksum mismatch); nothing was loaded")
    (head_len,) = struct.unpack("<I", body[8:12])
    header = json.loads(body[12 : 12 + head_len])
    if header.get("version") != VERSION:
        raise StateFileError(f"{path} has state format version {header.get('version')}, this runtime reads {VERSION}")
    for key, want in expect.items():
        if header.get(key) != want:
            raise StateFileError(f"{path} belongs to another model ({key} differs); load it with the model that saved it")
    arrays, offset = {}, 12 + head_len
    for spec in header["arrays"]:
        count = int(np.prod(spec["shape"], dtype=np.int64))
        size = count * np.dtype(spec["dtype"]).itemsize
        arrays[spec["name"]] = np.frombuffer(body, dtype=spec["dtype"], count=count, offset=offset).reshape(spec["shape"]).copy()
        offset += size
    if offset != len(body):
        raise StateFileError(f"{path} is corrupt (array sizes do not add up)")
    return arrays, header
