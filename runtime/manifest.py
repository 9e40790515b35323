"""The export folder's manifest, `lmn.json`: what the runtime reads before it loads any graph.

Schema (format_version 1):
  format: "lmn-export", format_version: 1
  model: the model config (arch, vocab_size, n_embd, ...)
  vocab_kind: "chars" (absent in manifests written before byte vocabularies) or "bytes"
  vocab: the characters, in id order (a "chars" vocabulary only; "bytes" has 256 ids, the UTF-8 bytes)
  graphs: [{name, target ("onnx" | "coreml"), file, precision, inputs, outputs, state, ...}]
          name: "step" (any pointer), "step_levels" (a fast path, with `levels`), "prefill" (with `size`), ...
          precision: "fp32", "int8" or "int4" (weight-only), "dynamic-int8" (ONNX); "fp16" (Core ML);
          a graph absent: "fp32". The runtime picks graphs by these fields, never by file name.
          quantization (quantized graphs): {kind: "weight-only" | "dynamic", bits, block, method,
          accuracy_level, moved_up, fp32_ops, fp32_weights, ...}: how, and what stayed fp32
          inputs/outputs: [{name, shape (ints or "batch"), dtype}]
          state: [{input, output, layout}]: outputs a caller feeds back as the next inputs
          (name, precision, levels, size) is unique among the ONNX graphs
  files: {relative path: {sha256, bytes}}, source: {checkpoint, sha256}, parity: [reports]
  integrity: {sha256, covers}: sha256 of the manifest itself (`manifest_digest`), so one changed
          byte anywhere in lmn.json (a vocabulary character, a shape) is refused on load
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


INTEGRITY_COVERS = "lmn.json without its integrity field, as JSON with sorted keys, no spaces, UTF-8"


def manifest_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's content: every field but `integrity`, serialized canonically."""
    content = {k: v for k, v in data.items() if k != "integrity"}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its integrity field set (what an exporter writes)."""
    return {**{k: v for k, v in data.items() if k != "integrity"},
            "integrity": {"sha256": manifest_digest(data), "covers": INTEGRITY_COVERS}}


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
    def vocab_kind(self) -> str:
        return self.data.get("vocab_kind", "chars")

    @property
    def vocab(self) -> str | None:
        """The characters of a "chars" vocabulary; None for "bytes"."""
        return self.data.get("vocab")

    def graph(self, name: str, target: str = "onnx", precision: str | None = None) -> dict[str, Any] | None:
        """The first graph with this name and target (and precision, when given)."""
        found = self.graphs(target, name, precision)
        return found[0] if found else None

    def graphs(self, target: str | None = None, name: str | None = None,
               precision: str | None = None) -> list[dict[str, Any]]:
        """The graphs of a target (all when None), of a name and of a precision when those are given."""
        return [g for g in self.data["graphs"] if (target is None or g["target"] == target)
                and (name is None or g["name"] == name) and (precision is None or precision_of(g) == precision)]

    def precisions(self, target: str = "onnx") -> list[str]:
        """The precisions of this target's step graphs, fp32 first."""
        return sorted({precision_of(g) for g in self.graphs(target, "step")}, key=lambda p: (p != "fp32", p))


def precision_of(graph: dict[str, Any]) -> str:
    return graph.get("precision", "fp32")


def check_integrity(path: Path, data: dict[str, Any]) -> None:
    integrity = data.get("integrity")
    if not isinstance(integrity, dict) or "sha256" not in integrity:
        raise ManifestError(f"{path} carries no integrity check (written by an older lmn-export); re-export the model")
    try:
        digest = manifest_digest(data)
    except ValueError:  # NaN or inf: never written by lmn-export
        digest = None
    if digest != integrity["sha256"]:
        raise ManifestError(f"{path} was modified after export (its content does not match its own sha256); "
                            "re-export the model, or restore the folder")


def _fail(path: Path, what: str) -> None:
    raise ManifestError(f"{path}: {what}; re-export the model")


def check_fields(path: Path, data: dict[str, Any]) -> None:
    """The fields the runtime reads have the types it reads them as."""
    for key, kind in (("model", dict), ("graphs", list), ("files", dict)):
        if not isinstance(data.get(key), kind):
            _fail(path, f"{key!r} is missing or not a {kind.__name__}")
    check_vocab(path, data)
    for entry in data["graphs"]:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "target", "file")) \
                or not all(isinstance(entry.get(k), list) for k in ("inputs", "outputs")):
            _fail(path, f"a graph entry lacks name, target, file, inputs or outputs: {str(entry)[:80]}")
        if entry["file"] not in data["files"]:
            _fail(path, f"graph file {entry['file']} is not listed under 'files'")
        if not isinstance(precision_of(entry), str):
            _fail(path, f"graph {entry['file']} has a precision that is not a string")
    onnx = [(g["name"], precision_of(g), str(g.get("levels")), str(g.get("size"))) for g in data["graphs"] if g["target"] == "onnx"]
    twice = sorted({i for i in onnx if onnx.count(i) > 1})
    if twice:  # the runtime picks ONNX graphs by these fields: each must name one graph
        _fail(path, f"two onnx {twice[0][0]} graphs of precision {twice[0][1]} (and the same levels and size) are listed")
    for name, facts in data["files"].items():
        if not isinstance(facts, dict) or not isinstance(facts.get("sha256"), str):
            _fail(path, f"file entry {name!r} lacks a sha256")


def check_vocab(path: Path, data: dict[str, Any]) -> None:
    """`vocab_kind` is "chars" (with `vocab`, one character per id) or "bytes" (256 ids, no `vocab`)."""
    kind, size = data.get("vocab_kind", "chars"), data["model"].get("vocab_size")
    if kind == "bytes":
        if "vocab" in data:
            _fail(path, "a byte vocabulary lists no characters, but 'vocab' is present")
        if size != 256:
            _fail(path, f"a byte vocabulary has 256 ids, model says {size}")
    elif kind == "chars":
        if not isinstance(data.get("vocab"), str):
            _fail(path, "'vocab' is missing or not a str")
        if len(data["vocab"]) != size:
            _fail(path, f"vocabulary has {len(data['vocab'])} characters, model says {size}")
    else:
        _fail(path, f"vocab_kind {kind!r} is not 'chars' or 'bytes' (a newer lmn wrote it?)")


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
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {version!r} ({type(version).__name__}), this runtime reads the integer "
            f"{FORMAT_VERSION}; re-export with a matching lmn version"
        )
    check_integrity(path, data)
    check_fields(path, data)
    manifest = Manifest(directory, data)
    if verify_files:
        for name, facts in data["files"].items():
            target = directory / name
            if not target.resolve().is_relative_to(directory.resolve()):
                raise ManifestError(f"{path} lists {name!r}, outside the export folder; re-export the model")
            if not target.exists():
                raise ManifestError(f"{directory} lacks {name}, listed in {MANIFEST}; re-export the model")
            if file_digest(target) != facts["sha256"]:
                raise ManifestError(f"{target} does not match its sha256 in {MANIFEST} (modified or corrupt); re-export")
    return manifest
