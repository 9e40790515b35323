"""Saving and loading one stream's state: a few KB whatever the conversation's length.

File layout: MAGIC (8 bytes) | header length (u32 LE) | header (JSON) | arrays (raw, in header
order) | sha256 of everything before it (32 bytes). The header names the model (its source
checkpoint's sha256), each array's name, dtype and shape, and `pending_bytes`: the hex of the
bytes of a character a byte-vocabulary stream has generated only in part (absent in older files:
none), so a state saved mid-character resumes it exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np

from . import reader
from .atomic import write_atomic

MAGIC = b"LMNSTATE"
VERSION = 1
LAYOUT = ("MAGIC: the 8 ASCII bytes LMNSTATE | header length n: u32 little-endian | header: n bytes of UTF-8 JSON, "
          "an object (any key order and spacing) with version 1, model (lmn.json source.sha256, or \"\" when the "
          "manifest has no source), backend_state (the step graph's state input names, in its `state` order), "
          "tokens_seen (integer >= 0), pending_bytes (lowercase hex of the 0 to 3 held bytes of an incomplete UTF-8 "
          "character; optional, absent means none; always \"\" for a chars vocabulary), arrays ([{name, dtype, "
          "shape}]) | the arrays' raw little-endian bytes, C order, in header order, with no padding: each state "
          "input of the step graph by name with its lmn.json shape and batch 1 (memory [1, ...], pointer [1]), then "
          "logits float32 [vocab size] iff tokens_seen > 0 | sha256 of all the bytes before it (32 bytes). Nothing "
          "else: any other array, a size that does not add up, a non-finite float or a negative integer is refused")


class StateFileError(Exception):
    """A state file that cannot be loaded (truncated, corrupt, other model) or written; nothing changed."""


def save_state(path: Path | str, arrays: dict[str, np.ndarray], meta: dict) -> int:
    """Write atomically (`runtime.atomic.write_atomic`); returns the file size in bytes."""
    header = {"version": VERSION, **meta,
              "arrays": [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in arrays.items()]}
    head = json.dumps(header, sort_keys=True).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())
    data = body + hashlib.sha256(body).digest()
    try:
        return write_atomic(path, data)
    except OSError as e:
        raise StateFileError(f"cannot write {path}: {e.strerror or e}; the file was left as it was") from None


MAX_HEADER_BYTES = 1 << 16  # a header names a handful of arrays: a few hundred bytes
MAX_TOKENS_SEEN = 2**53 - 1  # the largest count every client (JavaScript numbers included) holds exactly
DTYPES = ("float32", "float16", "int64", "int32")


def max_file_bytes(array_bytes: int) -> int:
    """The largest state file whose arrays hold `array_bytes`: the refusal limit checked before reading."""
    return len(MAGIC) + 4 + MAX_HEADER_BYTES + array_bytes + 32


def load_state(path: Path | str, expect: dict, max_bytes: int) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a state file of at most `max_bytes` (`max_file_bytes`); `expect` holds header fields
    that must match (e.g. model). Any failure is a StateFileError."""
    path = Path(path)
    data = reader.read_bytes(path, StateFileError, max_bytes, what="state file (saved with /save or Stream.save)")
    if len(data) < len(MAGIC) + 4 + 32 or not data.startswith(MAGIC):
        raise StateFileError(f"{path} is not an lmn state file")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise StateFileError(f"{path} is truncated or corrupt (checksum mismatch); nothing was loaded")
    (head_len,) = struct.unpack("<I", body[8:12])
    if head_len > min(MAX_HEADER_BYTES, len(body) - 12):
        raise StateFileError(f"{path} gives a header of {head_len:,} bytes (at most {MAX_HEADER_BYTES:,}); nothing was loaded")
    header = reader.parse_json(body[12 : 12 + head_len], f"{path}'s header", StateFileError, "nothing was loaded")
    if not isinstance(header, dict):
        raise StateFileError(f"{path} has an unreadable header; nothing was loaded")
    if header.get("version") != VERSION:
        raise StateFileError(f"{path} has state format version {reader.excerpt(header.get('version'))}, "
                             f"this runtime reads {VERSION}")
    for key, want in expect.items():
        if header.get(key) != want:
            raise StateFileError(f"{path} belongs to another model ({key} differs); load it with the model that saved it")
    arrays, offset = {}, 12 + head_len
    table = header.get("arrays")
    if not isinstance(table, list):
        raise StateFileError(f"{path} has a malformed array table (not a list); nothing was loaded")
    for spec in table:
        problem = array_problem(spec, len(body) - offset)
        if problem:
            raise StateFileError(f"{path} has a malformed array table ({problem}); nothing was loaded")
        count = math.prod(spec["shape"])
        arrays[spec["name"]] = np.frombuffer(body, dtype=spec["dtype"], count=count, offset=offset).reshape(spec["shape"]).copy()
        offset += count * np.dtype(spec["dtype"]).itemsize
    if offset != len(body):
        raise StateFileError(f"{path} is corrupt (array sizes do not add up)")
    return arrays, header


def array_problem(spec, room: int) -> str | None:
    """Why an array table entry is unusable with `room` bytes left in the file, or None."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return f"entry {reader.excerpt(spec)} is not {{name, dtype, shape}}"
    if spec.get("dtype") not in DTYPES:
        return f"dtype {reader.excerpt(spec.get('dtype'))}, not one of {', '.join(DTYPES)}"
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
        return f"shape {reader.excerpt(shape)} is not a list of at most 8 whole numbers >= 0"
    if math.prod(shape) * np.dtype(spec["dtype"]).itemsize > room:
        return f"{spec['name']} of shape {reader.excerpt(shape)} needs more bytes than the file has"
    return None
