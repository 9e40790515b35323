"""ONNX export of the step and prefill graphs (torch.onnx dynamo exporter)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from runtime.atomic import write_atomic
from models import LMN, GPT
from .graphs import BATCH, GraphSpec, PrefillGraph, example_state, step_graph, prefill_spec, step_spec

DEFAULT_OPSET = 18
# The dynamo exporter writes opset 18 or newer (an older request silently becomes 18), and this
# project's graphs were checked to load and run in onnxruntime 1.32 up to opset 25.
MIN_OPSET, MAX_OPSET = 18, 25
MAX_BATCH = 4096
log = logging.getLogger(__name__)


class ExportError(Exception):
    """An export that cannot be produced; the message says what to do."""


def _dims(spec: GraphSpec) -> dict[str, dict[int, torch.export.Dim]]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {t.name: {i: batch for i, d in enumerate(t.shape) if d == BATCH} for t in spec.inputs}


def _export(graph: torch.nn.Module, args: tuple, spec: GraphSpec, path: Path, opset: int) -> None:
    """Export, then make the file reproducible: fixed producer fields, no doc strings or file paths."""
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                graph.eval(), args, dynamo=True, opset_version=opset,
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                dynamic_shapes=_dims(spec), optimize=True, verbose=False,
            )
        except Exception as e:  # the exporter raises many types; report the cause in one line
            cause = e.__cause__ or e
            raise ExportError(f"torch.onnx.export failed at opset {opset}: {type(cause).__name__}: "
                              f"{str(cause).strip().splitlines()[0]}") from e
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"asked for opset {opset}, the exporter wrote opset {written}; choose --opset {written}")
    proto.producer_name, proto.producer_version = "lmn_export", "1"
    for node in proto.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    proto.doc_string = ""
    del proto.metadata_props[:]
    onnx.checker.check_model(proto)
    write_atomic(path, proto.SerializeToString(deterministic=True))


def export_step(model: LMN | GPT, path: Path, opset: int = DEFAULT_OPSET, levels: int | None = None,
                full: bool = False) -> GraphSpec:
    """The step graph; for an LMN with `levels` / `full`, a fast path valid only where they hold (`LMN.step`)."""
    spec = step_spec(model.config)
    args = (torch.zeros(2, dtype=torch.int64), *example_state(model, 2))
    _export(step_graph(model, levels=levels, full=full), args, spec, path, opset)
    return spec


def export_prefill(model: LMN, path: Path, size: int, opset: int = DEFAULT_OPSET) -> GraphSpec:
    spec = prefill_spec(model.config, size)
    memory, _ = example_state(model, 2)
    args = (torch.zeros(2, size, dtype=torch.int64), torch.tensor([size, 1], dtype=torch.int64), memory,
            torch.tensor([0, 2**31 + 5], dtype=torch.int64))
    _export(PrefillGraph(model), args, spec, path, opset)
    return spec


def export_kv_layout(model: GPT, path: Path, layout: str, opset: int = DEFAULT_OPSET) -> None:
    """The GPT step in the benchmark's "rows" (in-place cache) or "concat" (growing cache) layout."""
    from .graphs import KVConcatGraph, KVRowsGraph

    cfg = model.config
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    token = torch.zeros(2, dtype=torch.int64)
    if layout == "rows":
        cache = torch.zeros(2, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.head_dim)
        graph, args = KVRowsGraph(model), (token, cache, cache.clone(), torch.tensor([3, 5]))
        names = (["token", "keys", "values", "pointer"], ["logits", "key_rows", "value_rows"])
        rows = torch.export.Dim("capacity", min=2, max=cfg.block_size)  # sized per stream by the caller
        dims = {"token": {0: batch}, "keys": {0: batch, 3: rows}, "values": {0: batch, 3: rows}, "pointer": {0: batch}}
    else:
        past = torch.export.Dim("past", min=1, max=cfg.block_size - 1)
        cache = torch.zeros(2, cfg.n_layer, cfg.n_head, 7, cfg.head_dim)
        graph, args = KVConcatGraph(model), (token, cache, cache.clone())
        names = (["token", "past_keys", "past_values"], ["logits", "present_keys", "present_values"])
        dims = {"token": {0: batch}, "past_keys": {0: batch, 3: past}, "past_values": {0: batch, 3: past}}
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph.eval(), args, dynamo=True, opset_version=opset, input_names=names[0],
                                    output_names=names[1], dynamic_shapes=dims, optimize=True)
    program.save(str(path))
