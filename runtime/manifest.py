"""The export folder's manifest, `lmn.json`: what the runtime reads before it loads any graph.

Schema (format_version 1):
  format: "lmn-export", format_version: 1
  model: the model config (arch, vocab_size, n_embd, ...), vocab: the characters, in id order
  graphs: [{name, target ("onnx" | "coreml"), file, precision, inputs, outputs, state, ...}]
          inputs/outputs: [{name, shape (ints or "batch"), dtype}]
          state: [{input, output, layout}]: outputs a caller feeds back as the next inputs
  files: {relative path: {sha256, bytes}}, source: {checkpoint, sha256}, parity: [reports]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "lmn-export"
FORMAT_VERSION = 1
MANIFEST = "lmn.json"


class ManifestError(Exception):
    """An export folder the runtime cannot trust; the message says what to do."""


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder (e.g. .mlpackage): its relative paths and contents, sorted."""
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(item.relative_to(path).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(item.read_bytes()).digest())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@dataclass
class Manifest:
    directory: Path
    data: dict[str, Any]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def vocab(self) -> str:
        return self.data["vocab"]

    def graph(self, name: str, target: str = "onnx") -> dict[str, Any] | None:
        for entry in self.data["graphs"]:
            if entry["name"] == name and entry["target"] == target:
                return entry
        return None

    def graphs(self, target: str | None = None) -> list[dict[str, Any]]:
        return [g for g in self.data["graphs"] if target is None or g["target"] == target]


def read_manifest(directory: Path | str, verify_files: bool = True) -> Manifest:
    """Read and check `lmn.json`: format, version, required fields and (optionally) file hashes."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ManifestError(f"no export folder at {directory}; create one with lmn-export")
    if not path.is_file():
        raise ManifestError(f"{directory} is not an lmn export ({MANIFEST} is missing); create one with lmn-export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is corrupt ({e}); re-export the model") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an lmn export manifest; re-export the model")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {data.get('format_version')}, this runtime reads {FORMAT_VERSION}; "
            "re-export with a matching lmn version"
        )
    for key in ("model", "vocab", "graphs", "files"):
        if key not in data:
            raise ManifestError(f"{path} lacks {key!r}; re-export the model")
    if len(data["vocab"]) != data["model"].get("vocab_size"):
        raise ManifestError(f"{path}: vocabulary has {len(data['vocab'])} characters, model says {data['model'].get('vocab_size')}")
    manifest = Manifest(directory, data)
    if verify_files:
        for name, facts in data["files"].items():
            target = directory / name
            if not target.exists():
                raise ManifestError(f"{directory} lacks {name}, listed in {MANIFEST}; re-export the model")
            if file_digest(target) != facts["sha256"]:
                raise ManifestError(f"{target} does not match its sha256 in {MANIFEST} (modified or corrupt); re-export")
    return manifest
