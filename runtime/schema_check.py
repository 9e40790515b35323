"""Check a JSON document against `lmn.schema.json` without third-party packages.

Implements the JSON Schema (2020-12) keywords that schema uses, and refuses a schema that uses any
other (so a keyword added to the schema cannot be silently ignored here). The test suite checks
that this agrees with the `jsonschema` package on valid and broken manifests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .reader import MiB, excerpt, read_json

SCHEMA_FILE = "lmn.schema.json"
SCHEMA_PATH = Path(__file__).with_name(SCHEMA_FILE)
ANNOTATIONS = {"$schema", "$id", "title", "description"}
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "minimum",
            "minLength", "minItems", "pattern", "oneOf", "$ref", "$defs"} | ANNOTATIONS
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


class SchemaViolation(ValueError):
    """A document that does not match the schema; the message gives the JSON path and the rule."""


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    schema = read_json(path, ValueError, MiB, "reinstall lmn", what="JSON schema")
    unsupported = sorted(_keywords(schema) - KEYWORDS)
    if unsupported:
        raise ValueError(f"{path} uses JSON Schema keywords this checker does not implement: {unsupported}")
    return schema


def _keywords(node: Any) -> set[str]:
    """Every keyword used in a schema (property names under `properties` and `$defs` are not keywords)."""
    if not isinstance(node, dict):
        return set()
    found = set(node)
    for key, value in node.items():
        if key in ("properties", "$defs"):
            for sub in value.values():
                found |= _keywords(sub)
        elif key in ("items", "additionalProperties"):
            found |= _keywords(value)
        elif key == "oneOf":
            for sub in value:
                found |= _keywords(sub)
    return found


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "null":
        return value is None
    return isinstance(value, TYPES[name]) and not (name != "boolean" and isinstance(value, bool))


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def check(document: Any, schema: dict) -> None:
    """Raise SchemaViolation at the first place `document` breaks `schema`."""
    _check(document, schema, schema, "$")


def _check(value: Any, node: dict, root: dict, where: str) -> None:
    if "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        _check(value, root["$defs"][ref.removeprefix("#/$defs/")], root, where)
    if "type" in node:
        names = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not any(_is_type(value, n) for n in names):
            raise SchemaViolation(f"{where} must be of type {' or '.join(names)}, got {type(value).__name__}")
    if "const" in node and not _same(value, node["const"]):
        raise SchemaViolation(f"{where} must be {node['const']!r}, got {excerpt(value)}")
    if "enum" in node and not any(_same(value, option) for option in node["enum"]):
        raise SchemaViolation(f"{where} must be one of {node['enum']}, got {excerpt(value)}")
    if "oneOf" in node:
        matched = 0
        for option in node["oneOf"]:
            try:
                _check(value, option, root, where)
                matched += 1
            except SchemaViolation:
                pass
        if matched != 1:
            raise SchemaViolation(f"{where} must match exactly one of its alternatives, matched {matched}: {excerpt(value)}")
    if _is_type(value, "number") and "minimum" in node and value < node["minimum"]:
        raise SchemaViolation(f"{where} must be >= {node['minimum']}, got {excerpt(value)}")
    if isinstance(value, str):
        if len(value) < node.get("minLength", 0):
            raise SchemaViolation(f"{where} must have at least {node['minLength']} characters")
        if "pattern" in node and not re.search(node["pattern"], value):
            raise SchemaViolation(f"{where} must match {node['pattern']}, got {excerpt(value)}")
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0):
            raise SchemaViolation(f"{where} must have at least {node['minItems']} items")
        if "items" in node:
            for i, item in enumerate(value):
                _check(item, node["items"], root, f"{where}[{i}]")
    if isinstance(value, dict):
        for key in node.get("required", ()):
            if key not in value:
                raise SchemaViolation(f"{where} lacks the required field {key!r}")
        properties = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                _check(item, properties[key], root, f"{where}.{key}")
            elif extra is False:
                raise SchemaViolation(f"{where} has a field the schema does not define: {excerpt(key)}")
            elif isinstance(extra, dict):
                _check(item, extra, root, f"{where}.{key}")
