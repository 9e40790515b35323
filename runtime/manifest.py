"""The export folder's manifest, `lmn.json`: the contract the runtime (or any client) reads first.

Format 4 is defined by `runtime/lmn.schema.json` (a copy lies in every export folder, named by
its "$schema" field) and checked on load, with the cross-field rules a schema cannot state
(`check_fields`). In short:
  model: the model config; vocabulary: kind, unit, tokens, id range, start token, unknown policies
  state: the state tensors (all zeros initially) and how to start at pointer p
  pointer: the supported input-pointer range (decimal strings) and the ranges parity validated
  fast_paths / prefill: the rules for choosing step_levels graphs and running prefill graphs, as data
  graphs: [{name, target, file, precision, quantization, inputs, outputs (each with a role), state
           pairs (input -> output), levels / size / pointer_max, weights}]: the runtime picks graphs by
           these fields and binds tensors by role, never by file or tensor name; an ONNX graph reads its
           weight tensors from `weights`, one file per precision that all its graphs share
  files: {relative path: {sha256, bytes}}; integrity: the sha256 of the manifest itself
A folder of an older format (format 3's graphs each embed their own copy of the weights; format 2's prefill
graphs start from the empty state only; format 1 predates this contract) is refused with a message to
re-export it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import reader
from .schema_check import SchemaViolation, check, load_schema

FORMAT = "lmn-export"
FORMAT_VERSION = 4
MANIFEST = "lmn.json"
MAX_MANIFEST_BYTES = 16 << 20  # the shipped lmn.json is under 100 KB; a 65,536-character vocabulary adds 256 KB


class ManifestError(Exception):
    """An export folder the runtime cannot trust; the message says what to do."""


PLACEHOLDER = "0" * 64  # integrity.sha256 while the digest is computed
INTEGRITY_COVERS = ("the bytes of lmn.json as written, with the 64 hex digits of integrity.sha256 (which occur exactly "
                    "once in the file) replaced by 64 '0' characters; any other byte changed (a re-serialization "
                    "included) is a modified manifest")


def manifest_text(data: dict[str, Any]) -> str:
    """lmn.json's text for `data`, sealed: integrity.sha256 is the sha256 of this text's UTF-8 bytes with
    that digest's 64 hex digits replaced by PLACEHOLDER (what an exporter writes)."""
    content = {k: v for k, v in data.items() if k != "integrity"}
    text = json.dumps({**content, "integrity": {"sha256": PLACEHOLDER, "covers": INTEGRITY_COVERS}},
                      indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if text.count(PLACEHOLDER) != 1:
        raise ValueError("a manifest field other than integrity.sha256 holds 64 zeros; it cannot be sealed")
    return text.replace(PLACEHOLDER, hashlib.sha256(text.encode("utf-8")).hexdigest())


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its integrity field set, as `manifest_text` writes it."""
    return json.loads(manifest_text(data))


def integrity_error(raw: bytes, data: dict[str, Any]) -> str | None:
    """Why the bytes `raw` of a manifest (parsed: `data`) fail their own integrity rule, or None."""
    integrity = data.get("integrity")
    if not isinstance(integrity, dict) or "sha256" not in integrity:
        return "carries no integrity check (written by an older lmn-export); re-export the model"
    digest = integrity["sha256"]
    if not isinstance(digest, str) or not re.fullmatch("[0-9a-f]{64}", digest) or raw.count(digest.encode()) != 1:
        return "has an integrity.sha256 that is not 64 lowercase hex digits found exactly once in the file; re-export the model"
    if hashlib.sha256(raw.replace(digest.encode(), PLACEHOLDER.encode())).hexdigest() != digest:
        return ("was modified after export (its bytes, re-serializations included, do not match its own sha256); "
                "re-export the model, or restore the folder")
    return None


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder (e.g. .mlpackage): its relative paths and contents, sorted."""
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(item.relative_to(path).as_posix().encode() + b"\0")
            digest.update(_hash_file(item).digest())
        return digest.hexdigest()
    return _hash_file(path).hexdigest()


def _hash_file(path: Path) -> "hashlib._Hash":
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest


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
    def vocabulary(self) -> dict[str, Any]:
        return self.data["vocabulary"]

    @property
    def vocab_kind(self) -> str:
        return self.vocabulary["kind"]

    @property
    def vocab(self) -> str | None:
        """The characters of a "chars" vocabulary; None for "bytes"."""
        return self.vocabulary.get("tokens")

    @property
    def fast_paths(self) -> dict[str, Any] | None:
        return self.data.get("fast_paths")

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
    why = integrity_error(path.read_bytes(), data)
    if why:
        raise ManifestError(f"{path} {why}")


def _fail(path: Path, what: str) -> None:
    raise ManifestError(f"{path}: {what}; re-export the model")


@functools.cache
def _schema() -> dict:
    return load_schema()


def check_schema(path: Path, data: dict[str, Any]) -> None:
    """`data` matches runtime/lmn.schema.json; a ManifestError names the field and the rule."""
    try:
        check(data, _schema())
    except SchemaViolation as e:
        _fail(path, f"does not match lmn.schema.json: {e}")


def io_with_role(tensors: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [t for t in tensors if t["role"] == role]


def role_tensor(tensors: list[dict[str, Any]], role: str) -> dict[str, Any]:
    """The one input or output with this role (check_fields made sure there is one)."""
    return io_with_role(tensors, role)[0]


def role_name(tensors: list[dict[str, Any]], role: str) -> str:
    return role_tensor(tensors, role)["name"]


def state_input(graph: dict[str, Any], tensor: str) -> str:
    """The input of a step graph that carries a state tensor (its `state` pair)."""
    return next(pair["input"] for pair in graph["state"] if pair["tensor"] == tensor)


def read_json(path: Path, error: type[Exception], max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """A JSON file of an export folder (`runtime.reader`: regular, bounded), or `error` saying to re-export."""
    return reader.read_json(path, error, max_bytes, "re-export the model", what=f"{path.name} file")


def graph_label(graph: dict[str, Any]) -> str:
    """How a graph is named in counts and messages: its file, with `#function` for a function of a Core ML package."""
    return graph["file"] + (f"#{graph['function']}" if graph.get("function") else "")


def check_fields(path: Path, data: dict[str, Any]) -> None:
    """The cross-field rules the schema cannot state: files listed, one graph per choice, roles complete."""
    check_vocab(path, data)
    state_names = {t["name"] for t in data["state"]["tensors"]}
    for entry in data["graphs"]:
        where = f"graph {entry['file']}"
        if entry["file"] not in data["files"]:
            _fail(path, f"{where} is not listed under 'files'")
        if entry["target"] == "onnx" and entry.get("weights") not in data["files"]:
            _fail(path, f"{where} names no weights file listed under 'files'")
        prefill = entry["name"] == "prefill"
        for kind, roles in (("inputs", ("tokens", "length") if prefill else ("token",)), ("outputs", ("logits",))):
            for role in roles:
                if len(io_with_role(entry[kind], role)) != 1:
                    _fail(path, f"{where} must have exactly one {kind[:-1]} with role {role!r}")
        carried = [t.get("state") for t in entry["inputs"] + entry["outputs"] if t["role"] == "state"]
        if not set(carried) <= state_names or None in carried:
            _fail(path, f"{where} has a state input or output that names no state tensor in 'state.tensors'")
        names = {t["name"]: t for t in entry["inputs"] + entry["outputs"]}
        for pair in entry["state"]:
            if names.get(pair["input"], {}).get("state") != pair["tensor"] or names.get(pair["output"], {}).get("state") != pair["tensor"]:
                _fail(path, f"{where} pairs {pair['input']} -> {pair['output']}, which do not both carry {pair['tensor']!r}")
        if {p["tensor"] for p in entry["state"]} != state_names or not prefill and "pointer_max" not in entry:
            _fail(path, f"{where} does not carry every state tensor, or lacks pointer_max")
        if entry["name"] == "step_levels" and "levels" not in entry or prefill and "size" not in entry:
            _fail(path, f"{where} lacks its {'size' if prefill else 'levels'}")
    packages = [(g["file"], g.get("function")) for g in data["graphs"] if g["target"] == "coreml"]
    if len(set(packages)) != len(packages):
        _fail(path, "two Core ML graphs name the same package and function")
    onnx = [(g["name"], precision_of(g), str(g.get("levels")), str(g.get("size"))) for g in data["graphs"] if g["target"] == "onnx"]
    twice = sorted({i for i in onnx if onnx.count(i) > 1})
    if twice:  # the runtime picks ONNX graphs by these fields: each must name one graph
        _fail(path, f"two onnx {twice[0][0]} graphs of precision {twice[0][1]} (and the same levels and size) are listed")
    if not any(g["name"] == "step" for g in data["graphs"]):
        _fail(path, "no step graph is listed")
    if any(g["name"] == "step_levels" for g in data["graphs"]) and "fast_paths" not in data:
        _fail(path, "step_levels graphs are listed without the 'fast_paths' rule")
    if any(g["name"] == "prefill" for g in data["graphs"]) and "prefill" not in data:
        _fail(path, "prefill graphs are listed without the 'prefill' rule")


def check_vocab(path: Path, data: dict[str, Any]) -> None:
    """The vocabulary's size agrees with its tokens, its id range and the model."""
    vocabulary, size = data["vocabulary"], data["model"]["vocab_size"]
    tokens = vocabulary.get("tokens")
    if vocabulary["kind"] == "bytes" and (tokens is not None or size != 256):
        _fail(path, f"a byte vocabulary has 256 ids and lists no tokens (model says {size})")
    if vocabulary["kind"] == "chars" and (not isinstance(tokens, str) or len(tokens) != size):
        _fail(path, f"the vocabulary lists {len(tokens) if isinstance(tokens, str) else 'no'} characters, model says {size}")
    if vocabulary["size"] != size or vocabulary["token_ids"]["max"] != size - 1:
        _fail(path, f"vocabulary size {vocabulary['size']} (ids up to {vocabulary['token_ids']['max']}) disagrees "
                    f"with the model's {size}")
    if any(i >= size for i in vocabulary["start"]["ids"]):
        _fail(path, "the start token's ids are outside the vocabulary")


def read_manifest(directory: Path | str, verify_files: bool = True) -> Manifest:
    """Read and check `lmn.json`: format, version, required fields and (optionally) file hashes."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        if directory.exists():
            raise ManifestError(f"{directory} is a file, not an export folder; give the folder lmn-export wrote")
        raise ManifestError(f"no export folder at {directory}; create one with lmn-export")
    if not path.exists():
        raise ManifestError(f"{directory} is not an lmn export ({MANIFEST} is missing); create one with lmn-export")
    data = read_json(path, ManifestError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an lmn export manifest; re-export the model")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {reader.excerpt(version)} ({type(version).__name__}), this runtime reads the integer "
            f"{FORMAT_VERSION}; re-export the model with this lmn's lmn-export (it writes format {FORMAT_VERSION})"
        )
    check_integrity(path, data)
    check_schema(path, data)
    check_fields(path, data)
    check_files(directory, data["files"], verify_files)
    return Manifest(directory, data)


def check_files(directory: Path, files: dict[str, Any], verify: bool) -> None:
    """Every listed file lies inside the folder (checked even when `verify` is off: no path, absolute
    path or symlink may lead out) and is a regular file or a folder (never a FIFO or device, which
    would hang a reader); with `verify`, each exists with its recorded size (checked before hashing)
    and sha256."""
    root = directory.resolve()
    for name, facts in files.items():
        target = directory / name
        if not target.resolve().is_relative_to(root):
            raise ManifestError(f"{directory / MANIFEST} lists {reader.excerpt(name)}, outside the export folder "
                                "(a '..', absolute path or symlink); re-export the model")
        try:
            mode = target.stat().st_mode
        except OSError:
            mode = None
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ManifestError(f"{target} is {reader.file_kind(mode)}, not a file lmn-export wrote; re-export the model")
        if not verify:
            continue
        if mode is None:
            raise ManifestError(f"{directory} lacks {name}, listed in {MANIFEST}; re-export the model")
        size = file_size(target)
        if size != facts["bytes"]:
            raise ManifestError(f"{target} has {size:,} bytes, {MANIFEST} records {facts['bytes']:,} (modified or "
                                "corrupt); re-export the model")
        if file_digest(target) != facts["sha256"]:
            raise ManifestError(f"{target} does not match its sha256 in {MANIFEST} (modified or corrupt); re-export")
