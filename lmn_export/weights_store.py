"""One copy of each precision's weights on disk: the graphs of a precision share one external-data file.

An export builds several ONNX graphs per precision (the step, its fast paths, the prefill sizes), each
traced on its own, so each embeds the same weights. `store_weights_once` moves every weight tensor of a
precision's graphs into one file, `weights.<precision>.bin`, each distinct tensor once, and rewrites the
graphs to read it as ONNX external data. A prefill graph's weights that the exporter folded into their
transposes are stored once too: the graph reads the stored tensor through a Transpose node (onnxruntime
folds it at load). The graphs' intermediate value names (the exporter's long generated ones; not the weights'
names) become short ones and their node names and shape annotations go: with the weights gone they were most of
a graph's bytes. Each graph computes exactly what it computed before: the rewrite is checked by reading every
tensor back through the stored file and comparing digests.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from runtime.atomic import write_atomic

STORED_MIN_BYTES = 256  # smaller tensors (shapes, scalars) stay inside their graph: a reference costs ~70 bytes
ALIGN = 64  # each stored tensor starts at a multiple of this offset (SIMD-friendly when a reader maps the file)
TRANSPOSED = "__stored_transposed"  # suffix of an initializer that holds the transpose of the graph's tensor


class WeightsStoreError(RuntimeError):
    """The rewritten graphs would not read the tensors the exported graphs held (a bug, never user error)."""


def weights_file(precision: str) -> str:
    """The name of a precision's shared weights file (lmn.json graph field `weights`)."""
    return f"weights.{precision}.bin"


@dataclass
class StoredWeights:
    file: str
    bytes: int  # the file's size
    tensors: int  # distinct tensors stored
    references: int  # initializers across the graphs that read the file
    transposed: int  # of those, read as the transpose of a stored tensor


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _key(array: np.ndarray) -> tuple:
    return str(array.dtype), array.shape, _digest(array)


def _graphs(graph: onnx.GraphProto):
    """A graph and every subgraph under it (If / Loop bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


class _Store:
    """The weights file being built: distinct tensors appended at aligned offsets."""

    def __init__(self, name: str):
        self.name, self.blob, self.where = name, bytearray(), {}
        self.references = self.transposed = 0

    def offset(self, array: np.ndarray) -> tuple[int, int] | None:
        return self.where.get(_key(array))

    def add(self, array: np.ndarray) -> tuple[int, int]:
        self.blob.extend(b"\0" * (-len(self.blob) % ALIGN))
        place = self.where[_key(array)] = (len(self.blob), array.nbytes)
        self.blob.extend(np.ascontiguousarray(array).tobytes())
        return place

    def reference(self, name: str, data_type: int, dims, place: tuple[int, int]) -> TensorProto:
        tensor = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.name), ("offset", str(place[0])), ("length", str(place[1]))):
            tensor.external_data.add(key=key, value=value)
        self.references += 1
        return tensor


def _short_name(index: int) -> str:
    return "_" + np.base_repr(index, 36).lower()


def _compact_names(model: onnx.ModelProto) -> None:
    """Rename every value but the graph's inputs and outputs (the contract's names) and its initializers (lmn.json's
    quantization record names the weights it left in fp32) to a short name, one name per value across all
    subgraphs; drop node names and shape annotations (onnxruntime infers them)."""
    graph = model.graph
    kept = {v.name for v in graph.input} | {v.name for v in graph.output}
    kept |= {t.name for g in _graphs(graph) for t in g.initializer}
    fresh = (n for n in map(_short_name, itertools.count()) if n not in kept)
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in kept:
            return name
        if name not in names:
            names[name] = next(fresh)
        return names[name]

    for g in _graphs(graph):
        del g.value_info[:]
        if g is not graph:  # a subgraph's own inputs and outputs are internal values too
            for value in list(g.input) + list(g.output):
                value.name = short(value.name)
        for node in g.node:
            node.name = ""
            node.input[:] = [short(n) for n in node.input]
            node.output[:] = [short(n) for n in node.output]


def _rewrite(model: onnx.ModelProto, store: _Store) -> dict[str, str]:
    """Point the model's large initializers at `store`; returns {initializer name: digest of what it must read}."""
    expected = {}
    for graph in _graphs(model.graph):
        transposes = []
        for i, tensor in enumerate(graph.initializer):
            array = numpy_helper.to_array(tensor)
            if array.nbytes < STORED_MIN_BYTES or array.dtype == object:
                continue
            place, name, dims = store.offset(array), tensor.name, array.shape
            if place is None and array.ndim == 2 and store.offset(array.T) is not None:
                place, name, dims = store.offset(array.T), tensor.name + TRANSPOSED, array.T.shape
                transposes.append(helper.make_node("Transpose", [name], [tensor.name], perm=[1, 0]))
                expected[name] = _digest(array.T)
                store.transposed += 1
            else:
                expected[name] = _digest(array)
            if place is None:
                place = store.add(array)
            graph.initializer[i].CopyFrom(store.reference(name, tensor.data_type, dims, place))
        for node in reversed(transposes):
            graph.node.insert(0, node)
    return expected


def store_each_precision(directory: Path, graphs: list[dict], progress=lambda message: None) -> None:
    """Each precision's ONNX graphs (manifest entries, files in `directory`) read one shared weights file; sets
    each entry's `weights` (lmn.json)."""
    for precision in dict.fromkeys(g["precision"] for g in graphs):
        entries = [g for g in graphs if g["precision"] == precision]
        stored = store_weights_once(directory, [g["file"] for g in entries], weights_file(precision))
        progress(f"stored the {precision} weights once: {stored.tensors} tensors, {stored.bytes:,} bytes in {stored.file}, "
                 f"read by {len(entries)} graphs")
        for entry in entries:
            entry["weights"] = stored.file


def store_weights_once(directory: Path, files: list[str], name: str) -> StoredWeights:
    """Rewrite the graph `files` in `directory` to read their weights from one file `name` there, each distinct
    tensor stored once; raises WeightsStoreError if any rewritten graph would read other bytes."""
    store, rewritten = _Store(name), []
    for file in files:
        model = onnx.load(str(directory / file))
        _compact_names(model)
        rewritten.append((file, model, _rewrite(model, store)))
    write_atomic(directory / name, bytes(store.blob))
    for file, model, expected in rewritten:
        check = onnx.ModelProto()
        check.CopyFrom(model)
        external_data_helper.load_external_data_for_model(check, str(directory))
        read = {t.name: _digest(numpy_helper.to_array(t)) for g in _graphs(check.graph) for t in g.initializer}
        wrong = [n for n, digest in expected.items() if read.get(n) != digest]
        if wrong:
            raise WeightsStoreError(f"{file} would read other bytes for {wrong[:3]} from {name}")
        write_atomic(directory / file, model.SerializeToString())
    return StoredWeights(name, len(store.blob), len(store.where), store.references, store.transposed)
