"""The one way lmn reads a file a user can hand it: a regular file, of bounded size, parsed with bounds.

`read_bytes` stats the path before opening it (a directory, FIFO, device or socket is refused, so
nothing blocks or reads forever) and refuses a file larger than the caller's stated limit before
reading a byte. `read_json` adds bounded parsing: nesting at most MAX_DEPTH deep, numbers at most
MAX_NUMBER_CHARS characters, and no NaN or infinity (JSON has none). Every failure is the caller's
own error type with a one-line message; any input it quotes is cut to a short `excerpt`.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

MAX_DEPTH = 64  # every lmn JSON file nests fewer than 10 levels
MAX_NUMBER_CHARS = 40  # a float64 needs at most 24 characters, an int64 20
EXCERPT_CHARS = 80
MiB = 1 << 20
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def excerpt(text: Any, limit: int = EXCERPT_CHARS) -> str:
    """`repr(text)`, cut to about `limit` characters with the full length said: safe to echo."""
    shown = repr(text)
    if len(shown) <= limit:
        return shown
    length = f"{len(text):,} characters" if isinstance(text, (str, bytes)) else f"{len(shown):,} characters as text"
    return f"{shown[:limit]}... ({length})"


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: Path | str, error: type[Exception], max_bytes: int | None = None,
                 what: str = "file") -> os.stat_result:
    """stat `path` (following symlinks) and refuse what is not a regular file, or is larger than `max_bytes`."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"no such file: {path}; give the path of a {what}") from None
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or e}); give a {what} you can read") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is {file_kind(info.st_mode)}, not a regular file; give the path of a {what}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise error(f"{path} is {info.st_size:,} bytes, more than the {max_bytes:,} a {what} may have; "
                    "give the right file")
    return info


def read_bytes(path: Path | str, error: type[Exception], max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes` (checked before reading, and again while reading)."""
    size = regular_file(path, error, max_bytes, what).st_size
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # swapped for a FIFO after stat: no hang
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{path} changed into a special file while being opened; give a regular file")
            data = f.read(size + 1)  # one byte more than stat said: a file growing past it is noticed below
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or e}); give a {what} you can read") from None
    if len(data) > size:
        raise error(f"{path} grew while being read; give a file that is not being written")
    return data


class _Refused(ValueError):
    """A JSON value the bounded parser refuses."""


def _number(text: str, convert):
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"a number of {len(text):,} characters (at most {MAX_NUMBER_CHARS})")
    value = convert(text)
    if isinstance(value, float) and not np.isfinite(value):
        raise _Refused(f"the number {text} overflows (JSON numbers must be finite)")
    return value


def _constant(name: str):
    raise _Refused(f"{name} (JSON numbers must be finite)")


def nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in a JSON text (strings skipped)."""
    codes = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    delta = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(delta).max(initial=0))


def parse_json(raw: bytes, where: str, error: type[Exception], advice: str) -> Any:
    """Parse UTF-8 JSON bytes with bounded depth and numbers; `error` names `where` and says `advice`."""
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise error(f"{where} nests {depth} levels deep (at most {MAX_DEPTH}); {advice}")
    try:
        return json.loads(raw.decode("utf-8"), parse_int=lambda s: _number(s, int),
                          parse_float=lambda s: _number(s, float), parse_constant=_constant)
    except _Refused as e:
        raise error(f"{where} holds {e}; {advice}") from None
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 (byte {e.start}); {advice}") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is corrupt (not valid JSON: {e.msg} at line {e.lineno} column {e.colno}); {advice}") from None
    except RecursionError:  # unreachable below MAX_DEPTH; kept so no input can escape as a traceback
        raise error(f"{where} nests too deep; {advice}") from None


def read_json(path: Path | str, error: type[Exception], max_bytes: int, advice: str, what: str = "JSON file") -> Any:
    """A JSON file's content, read with `read_bytes` and parsed with `parse_json`."""
    return parse_json(read_bytes(path, error, max_bytes, what), str(path), error, advice)
