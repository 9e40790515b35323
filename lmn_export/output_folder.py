"""Where an export lands: a staging folder beside the destination, published by rename.

An export is written into `.<name>.lmn-tmp-<pid>-<random>` in the destination's parent (a file
`STAGING_MARK` inside says an export made it) and renamed into place only after every check has
passed. Replacing a folder first renames the old one aside (`...-old`), so a crash at any instant
leaves the old export or the new one at the destination, never neither. Folders of a killed
export are cleaned up (or the old export put back) by the next export to the same place. Nothing
else is ever deleted: a folder that is not an lmn export is replaced only with `force`, and the
current directory, its ancestors, the home folder and `/` never.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runtime.atomic import TEMP_MARK, default_mode, fsync_directory
from runtime.manifest import MANIFEST

STAGING_MARK = ".lmn-export-staging"  # written first into every staging folder; nothing else is cleaned up
OLD_SUFFIX = "-old"


class DestinationError(Exception):
    """An --out that an export must not write to; the message says what to do."""


def check_destination(out: Path, force: bool) -> None:
    """Refuse destinations whose replacement could lose data the export did not create."""
    if str(out) in ("", ".") or out.name in ("", ".", ".."):
        raise DestinationError(f"--out {str(out)!r} names no new folder; give a folder name such as exports/mine")
    resolved = out.resolve()
    protected = {Path("/").resolve(), Path.home().resolve(), *Path.cwd().resolve().parents, Path.cwd().resolve()}
    if resolved in protected:
        raise DestinationError(f"--out {out} is {'/' if resolved == Path('/') else 'the current, home or a parent folder'}; "
                               "lmn-export never replaces it, even with --force: give a new folder")
    if out.is_symlink():
        raise DestinationError(f"--out {out} is a symlink; give the folder it points to, or another --out")
    if out.exists() and not out.is_dir():
        raise DestinationError(f"{out} exists and is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an lmn export" if (out / MANIFEST).is_file() else "files that are not an lmn export"
        raise DestinationError(f"{out} already holds {what}; pass --force to replace it, or choose another --out")


def _owner_alive(folder: Path) -> bool:
    """Whether the process that named this staging folder (`...-<pid>-...`) still runs."""
    try:
        pid = int(folder.name.split(TEMP_MARK, 1)[1].split("-", 1)[0])
        os.kill(pid, 0)
    except (IndexError, ValueError):
        return False
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale(out: Path) -> list[Path]:
    """Clean up after a killed export to `out`: delete its staging folders, put a set-aside export back."""
    removed = []
    for folder in sorted(out.parent.glob(f".{out.name}{TEMP_MARK}*")):
        set_aside = folder.name.endswith(OLD_SUFFIX)
        if not folder.is_dir() or _owner_alive(folder) or not (set_aside or (folder / STAGING_MARK).is_file()):
            continue
        if set_aside and not out.exists():
            os.replace(folder, out)  # killed between setting the old export aside and publishing: restore it
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A fresh staging folder beside `out`, removed on every exit unless `publish` moved it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARK}{os.getpid()}-", dir=out.parent))
    try:
        (work / STAGING_MARK).write_bytes(b"")
        yield work
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_directory(path)


def publish(work: Path, out: Path) -> None:
    """Move the finished staging folder to `out` (replacing it), keeping the mode of the folder replaced."""
    mode = stat.S_IMODE(out.stat().st_mode) if out.is_dir() else default_mode(directory=True)
    os.chmod(work, mode)
    _fsync_tree(work)
    old = None
    if out.exists():
        old = work.with_name(work.name + OLD_SUFFIX)  # a kill from here on: `remove_stale` restores it
        os.replace(out, old)
    os.replace(work, out)
    (out / STAGING_MARK).unlink()
    fsync_directory(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
