"""One copy of each precision's weights on disk: every ONNX graph of a precision reads one shared
weights file, each tensor stored once; the graphs compute what they computed with embedded weights;
an edited weights file, a graph without one and a format-3 folder are refused at load."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime
from lmn_export import weights_store
from lmn_export.weights_store import STORED_MIN_BYTES, TRANSPOSED, WeightsStoreError, store_weights_once
from runtime.manifest import ManifestError

from .test_contract import rewrite


def two_graphs(tmp_path):
    """Two graphs that embed the same weight W (64 x 32): one reads it as W, the other as its transpose
    (what the exporter writes for a prefill graph); plus a small bias that stays embedded."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    files = []
    for name, weight, transpose in (("a.onnx", w, 0), ("b.onnx", w.T.copy(), 1)):
        nodes = [helper.make_node("Gemm", ["x", "w", "bias"], ["y"], transB=transpose)]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
                                  [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "bias")])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / name))
        files.append(name)
    return files, w


def outputs(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_each_tensor_is_stored_once_and_the_graphs_compute_the_same(tmp_path):
    files, w = two_graphs(tmp_path)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    before = [outputs(tmp_path / f, x) for f in files]
    stored = store_weights_once(tmp_path, files, "weights.fp32.bin")
    assert stored.tensors == 1 and stored.transposed == 1 and stored.references == 2
    assert (tmp_path / "weights.fp32.bin").stat().st_size == w.nbytes  # W once; the bias stays in each graph
    for f, y in zip(files, before):
        model = onnx.load(str(tmp_path / f), load_external_data=False)
        embedded = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
        assert all(numpy_helper.to_array(t).nbytes < STORED_MIN_BYTES for t in embedded)
        # a transpose is exact and a Gemm reads the same numbers: bit-identical outputs
        np.testing.assert_array_equal(outputs(tmp_path / f, x), y)
        # the contract's names stay; internal names are short and nodes unnamed (graph bytes, not weights)
        assert [v.name for v in model.graph.input] == ["x"] and [v.name for v in model.graph.output] == ["y"]
        assert all(n.name == "" for n in model.graph.node)
        assert {t.name for t in model.graph.initializer} <= {"w", "bias", "w__stored_transposed"}  # weights keep theirs


def test_short_names_never_take_a_contract_name(tmp_path):
    """A graph whose input is already called `_0` keeps it; the renamed values skip it."""
    nodes = [helper.make_node("Relu", ["_0"], ["long_generated_name_1"]),
             helper.make_node("Neg", ["long_generated_name_1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("_0", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    store_weights_once(tmp_path, ["g.onnx"], "weights.fp32.bin")
    model = onnx.load(str(tmp_path / "g.onnx"))
    assert [list(n.input) + list(n.output) for n in model.graph.node] == [["_0", "_1"], ["_1", "y"]]
    x = np.array([-1.0, 0.0, 2.0], dtype=np.float32)
    out = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, {"_0": x})[0]
    np.testing.assert_array_equal(out, -np.maximum(x, 0))


def test_a_store_that_reads_back_other_bytes_is_refused(tmp_path, monkeypatch):
    """Negative control for the read-back check: a weights file written wrong fails the export, and
    leaves the graph files as they were."""
    files, _ = two_graphs(tmp_path)
    original = (tmp_path / files[0]).read_bytes()
    write = weights_store.write_atomic

    def corrupt(path, data):
        return write(path, bytes(b ^ 1 for b in data) if str(path).endswith(".bin") else data)
    monkeypatch.setattr(weights_store, "write_atomic", corrupt)
    with pytest.raises(WeightsStoreError, match="would read other bytes"):
        store_weights_once(tmp_path, files, "weights.fp32.bin")
    assert (tmp_path / files[0]).read_bytes() == original


def test_an_export_stores_each_precision_once(export_dir):
    """Every ONNX graph of the export (the committed tiny one, rebuilt by tests.data.build) names its precision's
    weights file (test_manifest_schema: one per precision of a quantized export); no graph embeds a weight; no
    tensor lies twice in a weights file (distinct offsets, and the file is no longer than its tensors
    plus alignment)."""
    manifest = json.loads((export_dir / "lmn.json").read_text(encoding="utf-8"))
    by_precision = defaultdict(set)
    for graph in (g for g in manifest["graphs"] if g["target"] == "onnx"):
        by_precision[graph["precision"]].add(graph["weights"])
        assert graph["weights"] in manifest["files"]
    assert all(len(files) == 1 for files in by_precision.values()), by_precision
    for precision, (weights,) in by_precision.items():
        places = set()
        for graph in (g for g in manifest["graphs"] if g["target"] == "onnx" and g["precision"] == precision):
            model = onnx.load(str(export_dir / graph["file"]), load_external_data=False)
            for t in model.graph.initializer:
                if t.data_location == TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in t.external_data}
                    assert info["location"] == weights
                    places.add((int(info["offset"]), int(info["length"])))
                else:
                    assert numpy_helper.to_array(t).nbytes < STORED_MIN_BYTES, (graph["file"], t.name)
            contract_names = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
            internal = {n for node in model.graph.node for n in (*node.input, *node.output)} - contract_names - {""}
            assert all(node.name == "" for node in model.graph.node) and not model.graph.value_info, graph["file"]
            internal -= {t.name for t in model.graph.initializer}  # weights keep their names (lmn.json names them),
            internal -= {n.output[0] for n in model.graph.node if n.input and n.input[0].endswith(TRANSPOSED)}  # also read
            assert max(map(len, internal)) <= len("_zzz"), (graph["file"], max(internal, key=len))
        size = (export_dir / weights).stat().st_size
        assert size <= sum(n for _, n in places) + weights_store.ALIGN * len(places), (precision, size)
        offsets = sorted(places)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(offsets, offsets[1:])), "stored tensors overlap"


@pytest.fixture
def copied(export_dir, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    return folder


def test_a_weights_file_edited_after_export_is_refused(copied):
    weights = copied / "weights.fp32.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="weights.fp32.bin.*re-export"):
        runtime.load(copied)


def test_a_graph_without_its_weights_file_is_refused(copied):
    def drop(d):
        d["graphs"][0].pop("weights")
    rewrite(copied, drop)
    with pytest.raises(ManifestError, match="names no weights file"):
        runtime.load(copied, verify=False)


def test_a_format_3_folder_is_refused_with_the_re_export_message(copied):
    """Format 3 embedded a copy of the weights in every graph; this runtime reads format 4 only."""
    rewrite(copied, lambda d: d.update(format_version=3))
    with pytest.raises(ManifestError, match="format version 3.*re-export the model"):
        runtime.load(copied)
