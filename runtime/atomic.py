"""The one way lmn writes a file a user relies on: all of it or none of it.

A write goes to a temp file with a unique name in the destination's own directory, is fsynced,
takes the mode of the file it replaces (new files: 0666 minus the umask), and is renamed over the
destination; the directory is fsynced so the rename survives a power cut. Any failure (full disk,
a directory in the way, a signal turned into an exception) removes the temp file and leaves the
destination as it was. A symlink is written through: its target is replaced, the link stays.
Concurrent writers to one path never share a temp name; a reader sees one whole version.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: os.umask is process-wide and racy under threads
TEMP_MARK = ".lmn-tmp-"  # every temp file or folder lmn creates carries this in its name


def default_mode(directory: bool = False) -> int:
    return (0o777 if directory else 0o666) & ~_UMASK


def resolve_target(path: Path | str) -> Path:
    """The file a write to `path` replaces: a symlink's target, else the path itself."""
    path = Path(path)
    if path.is_symlink():
        return path.resolve()
    return path


def fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a unique temp path beside `path`; on a clean exit it replaces `path` atomically.

    For libraries that write to a path (safetensors, torch.save); raises IsADirectoryError when a
    directory is in the way, before anything is written.
    """
    target = resolve_target(path)
    if target.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path")
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else default_mode()
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{TEMP_MARK}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(target.parent)


def write_atomic(path: Path | str, data: bytes | str) -> int:
    """Write `data` (str as UTF-8) to `path` atomically; returns the bytes written."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    return len(payload)
