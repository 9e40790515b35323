"""Where an export may land: destinations an export must refuse before it writes anything.

Writing itself goes through `runtime.atomic.staged_folder` (a staging folder beside --out, renamed
into place only after every check passed; a replaced export is set aside first, so a kill at any
instant leaves the old export or the new one; a killed export's leftovers are cleaned up by the
next export to the same place). This module decides what may be replaced: with `force`, an earlier
export holding nothing but the files its lmn.json lists (a replace deletes only what an export
wrote); a folder of anything else, the current directory, its ancestors, the home folder and `/` never.
"""

from __future__ import annotations

from pathlib import Path

from runtime.manifest import MANIFEST, ManifestError, read_json
from runtime.reader import excerpt


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
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        listed = read_json(out / MANIFEST, ManifestError).get("files")
    except (ManifestError, AttributeError):
        listed = None
    if not isinstance(listed, dict):
        raise DestinationError(f"{out} holds files that are not an lmn export; lmn-export replaces only an earlier "
                               "export (with --force): choose another --out")
    others = sorted(p.name for p in out.iterdir() if p.name != MANIFEST and p.name not in listed)
    if others:
        raise DestinationError(f"{out} holds files its {MANIFEST} does not list ({excerpt(', '.join(others))}); "
                               "lmn-export deletes only what an export wrote: move them out or choose another --out")
    if not force:
        raise DestinationError(f"{out} already holds an lmn export; pass --force to replace it, or choose another --out")
