"""The one way lmn writes a file a user relies on: all of it or none of it.

A write goes to a temp file with a unique name in the destination's own directory, is fsynced,
takes the mode of the file it replaces (new files: 0666 minus the umask), and is renamed over the
destination; the directory is fsynced so the rename survives a power cut. Any failure (full disk,
a directory in the way, a signal turned into an exception) removes the temp file and leaves the
destination as it was. A symlink is written through: its target is replaced, the link stays.
Concurrent writers to one path never share a temp name; a reader sees one whole version.

A folder of files is written the same way with `staged_folder`: into a staging folder beside the
destination, published by one rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
        tmp.write_bytes(payload)  # atomic_path fsyncs it before the rename
    return len(payload)


STAGING_MARK = ".lmn-staging"  # written first into every staging folder: no other folder is ever cleaned up
OLD_SUFFIX = "-old"  # a replaced folder, set aside until the new one is in place


def _owner_alive(folder: Path) -> bool:
    """Whether the process that named this staging folder (`.<name>.lmn-tmp-<pid>-...`) still runs."""
    try:
        os.kill(int(folder.name.split(TEMP_MARK, 1)[1].split("-", 1)[0]), 0)
    except (IndexError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_folders(path: Path) -> list[Path]:
    """Clean up after a killed `staged_folder` for `path`: delete its staging folders, and put back a
    folder it had set aside (when nothing took its place). Returns the folders deleted."""
    removed = []
    for folder in sorted(path.parent.glob(f".{path.name}{TEMP_MARK}*")):
        set_aside = folder.name.endswith(OLD_SUFFIX)
        if not folder.is_dir() or _owner_alive(folder) or not (set_aside or (folder / STAGING_MARK).is_file()):
            continue
        if set_aside and not path.exists():
            os.replace(folder, path)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _fsync_tree(folder: Path) -> None:
    for item in folder.rglob("*"):
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    for item in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_directory(item)


@contextlib.contextmanager
def staged_folder(path: Path | str) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on a clean exit it replaces `path` (nothing, or
    a folder: set aside, then removed) by rename, so `path` is the old folder or the new one, whole.

    On any error (a signal turned into an exception included) the staging folder is removed; what a
    SIGKILL leaves behind (hidden `.<name>.lmn-tmp-<pid>-...` folders) the next call for `path`
    cleans up. The caller decides whether `path` may be replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-", dir=path.parent))
    try:
        (work / STAGING_MARK).write_bytes(b"")
        yield work
        os.chmod(work, stat.S_IMODE(path.stat().st_mode) if path.is_dir() else default_mode(directory=True))
        _fsync_tree(work)
        old = None
        if path.exists():
            old = work.with_name(work.name + OLD_SUFFIX)  # a kill from here on: the next call puts it back
            os.replace(path, old)
        os.replace(work, path)
        (path / STAGING_MARK).unlink()
        fsync_directory(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
