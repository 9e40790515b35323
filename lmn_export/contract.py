"""lmn.json, format 3: the export's contract, built from the graphs an export wrote.

One builder for every writer (lmn-export, the benchmark's timing exports): the vocabulary, the
state and how it starts, the pointer range, the fast-path and prefill rules as data, each graph's
roles and precision, file digests, sealed and checked against `runtime/lmn.schema.json` before
it is written. What a client needs is here; nothing is left to file names or Python code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import runtime.manifest as schema
from runtime.atomic import write_atomic
from runtime.backends import FastPathRule
from runtime.state_file import LAYOUT as STATE_FILE_LAYOUT, MAGIC as STATE_MAGIC, VERSION as STATE_VERSION
from runtime.stream import PREFILL_MIN_TOKENS
from runtime.schema_check import SCHEMA_FILE, SCHEMA_PATH
from .graphs import BATCH, KV_LAYOUT, MEMORY_LAYOUT, POINTER_LAYOUT

CREATED_BY = "lmn_export 0.1.0"
INT_MAX = {"int64": 2**63 - 1, "int32": 2**31 - 1}
ID_RULES = {"chars": "token id i is the i-th code point of `tokens` (iterate code points, not UTF-16 units)",
            "bytes": "token id i is the byte value i of the text's UTF-8 encoding"}
UNITS = {"chars": "unicode code point", "bytes": "utf-8 byte"}
UNKNOWN_POLICIES = {"error": "refuse text that has a character outside the vocabulary (say which)",
                    "skip": "drop characters outside the vocabulary (only when the user asks for it)"}
LAYOUTS = {"memory": MEMORY_LAYOUT, "pointer": POINTER_LAYOUT,
           "keys": KV_LAYOUT.format(name="keys", what="key"), "values": KV_LAYOUT.format(name="values", what="value")}
FAST_PATH_RULE = ("for a step at input pointer p, if p >= valid_from_pointer for every row and every row gives the same "
                  "levels = min(trailing_zeros(p + 1), levels_cap), run the step_levels graph of those levels (same "
                  "precision) if the export has it; otherwise run the step graph. Both give the same outputs there.")
PREFILL_RULE = ("from any state, like a step: memory and pointer are a stream's state (the initial one, or one a step or "
                "prefill returned); tokens[b, :length[b]] are row b's next tokens, positions >= length[b] hold padding_id; "
                "outputs the logits at the last of them (position length[b] - 1) and the state after length[b] steps from "
                "the given state (pointer_out = pointer + length). Rows may be at different pointers. Choose the smallest "
                "size >= the tokens to feed, or run the largest repeatedly and then the smallest that holds the rest. "
                "length outside 1..size, or pointer + length - 1 > pointer.max, is an error the graph does not catch. "
                "A precision with no prefill graph of a size uses the `precision_fallback` one. The lmn runtime "
                "prefills every chunk of at least `min_prompt_tokens` tokens fed at once (a prompt, a chat turn, a "
                "pasted text, at any pointer) and steps shorter ones (outputs agree either way within the conformance "
                "tolerance; exact reproduction needs the same choice).")


def vocabulary_section(kind: str, chars: str | None) -> dict:
    """The vocabulary: its unit, ids, the start token `generate` feeds to an empty stream, unknown-character policies."""
    tokens = list(chars) if kind == "chars" else None
    size = len(tokens) if tokens is not None else 256
    start = "\n" if kind == "bytes" or "\n" in tokens else tokens[0]
    section = {"kind": kind, "unit": UNITS[kind], "size": size,
               **({"tokens": chars} if kind == "chars" else {}),
               "id_rule": ID_RULES[kind], "token_ids": {"min": 0, "max": size - 1},
               "start": {"text": start, "ids": list(start.encode()) if kind == "bytes" else [tokens.index(start)],
                         "when": "fed before generating from a stream that has been fed nothing"},
               "unknown": {"default": "error", "policies": dict(UNKNOWN_POLICIES)}}
    return section


def pointer_max(graph: dict, cfg: dict) -> int:
    """The largest input pointer a step graph supports: pointer + 1 must fit its dtype (LMN), or the KV cache's last row (GPT)."""
    if cfg["arch"] == "gpt":
        return cfg["block_size"] - 1
    dtype = next(t["dtype"] for t in graph["inputs"] if t.get("state") == "pointer")
    return INT_MAX[dtype] - 1


def state_section(step: dict) -> dict:
    """The state tensors of the step graph (batch axis included), all zeros initially."""
    inputs = {t["name"]: t for t in step["inputs"]}
    tensors = [{"name": pair["tensor"], "dtype": inputs[pair["input"]]["dtype"], "shape": inputs[pair["input"]]["shape"],
                "initial": 0, "layout": LAYOUTS[pair["tensor"]]} for pair in step["state"]]
    per_stream = sum(int(np.prod([d for d in t["shape"] if d != BATCH], dtype=np.int64)) * np.dtype(t["dtype"]).itemsize
                     for t in tensors)
    return {"tensors": tensors,
            "initial": "every state tensor all zeros: the empty stream at pointer 0",
            "start_at_pointer": "to start a stream at pointer p (as if p tokens had passed and been forgotten), use the "
                                "initial state with pointer = p; p <= pointer.max. Prefill graphs start from any state.",
            "bytes_per_stream": per_stream,
            "file": {"magic": STATE_MAGIC.decode(), "version": STATE_VERSION, "layout": STATE_FILE_LAYOUT}}


def pointer_section(graphs: list[dict], cfg: dict, validated: list[tuple[int, int, str]]) -> dict:
    steps = [g for g in graphs if g["name"] != "prefill"]
    return {"tensor": "pointer", "meaning": POINTER_LAYOUT, "min": "0",
            "max": str(max(int(g["pointer_max"]) for g in steps)),  # each graph's own bound: its pointer_max
            "validated": [{"from": str(a), "to": str(b), "graphs": what} for a, b, what in validated]}


def fast_paths_section(cfg: dict) -> dict:
    rule = FastPathRule.for_max_levels(cfg["max_levels"])  # the rule the fast-path graphs were traced for
    return {"graph": "step_levels", "pointer": "input", "levels": "min(trailing_zeros(pointer + 1), levels_cap)",
            "levels_cap": rule.levels_cap, "valid_from_pointer": rule.valid_from_pointer,
            "rows": "all", "fallback": "step", "rule": FAST_PATH_RULE}


def prefill_section() -> dict:
    return {"graph": "prefill", "starts_from": "any state", "length_min": 1, "length_max": "size",
            "logits_position": "length - 1", "padding_id": 0, "pointer_after": "pointer + length",
            "precision_fallback": "fp32", "min_prompt_tokens": PREFILL_MIN_TOKENS, "rule": PREFILL_RULE}


def build_manifest(directory: Path, cfg: dict, vocab_kind: str, chars: str | None, graphs: list[dict],
                   validated: list[tuple[int, int, str]], source: dict | None = None, parity: dict | None = None,
                   conformance: dict | None = None) -> dict:
    """The sealed format-3 manifest of the graphs in `directory` (a copy of the schema is placed beside them)."""
    graphs = [{**g, "pointer_max": str(pointer_max(g, cfg))} if g["name"] != "prefill" else dict(g) for g in graphs]
    step = next(g for g in graphs if g["name"] == "step")
    shutil.copyfile(SCHEMA_PATH, directory / SCHEMA_FILE)
    listed = [g["file"] for g in graphs] + [SCHEMA_FILE] + ([conformance["file"]] if conformance else [])
    files = {name: {"sha256": schema.file_digest(directory / name), "bytes": schema.file_size(directory / name)}
             for name in listed}
    data = {"$schema": SCHEMA_FILE, "format": schema.FORMAT, "format_version": schema.FORMAT_VERSION,
            "created_by": CREATED_BY, "model": cfg,
            "vocabulary": vocabulary_section(vocab_kind, chars),
            "state": state_section(step),
            "pointer": pointer_section(graphs, cfg, validated),
            **({"fast_paths": fast_paths_section(cfg)} if any(g["name"] == "step_levels" for g in graphs) else {}),
            **({"prefill": prefill_section()} if any(g["name"] == "prefill" for g in graphs) else {}),
            "graphs": graphs, "files": files,
            **({"conformance": conformance} if conformance else {}),
            **({"source": source} if source else {}), **({"parity": parity} if parity else {})}
    sealed = schema.seal(data)
    schema.check_schema(directory / schema.MANIFEST, sealed)  # the exporter never writes what the runtime refuses
    return sealed


def write_manifest(directory: Path, manifest: dict) -> None:
    write_atomic(directory / schema.MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
