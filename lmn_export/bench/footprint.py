"""Footprint: what each precision of an export costs on disk and in RAM against its weights.

Per precision: the bytes of every file the runtime may open at that precision (the step, fast-path and
prefill graphs and the weights file they share), the bytes of its weights (each distinct initializer of its step graph once: the least any
layout must store), and the resident memory a loaded model adds to a process that already runs
onnxruntime (measured in a fresh process: the model loaded with every graph opened, nothing run). The
goals of the one-copy-of-the-weights issue: files <= 1.15x the weights, resident memory <= 1.3x the
weights plus one stream's state.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import runtime

from .decode_speed import stepper_files, with_weights

FILES_GOAL = 1.15  # export files per precision / that precision's weight bytes
RSS_GOAL = 1.3  # resident memory of a loaded model / (weight bytes + state bytes)

# Run in a fresh interpreter: resident memory of onnxruntime with one trivial session (its one-time
# set-up), then after loading the export at one precision with every graph opened; also the graph files
# that model may open and its step graph's file, so the measuring process is the only one that loads it.
MEASURE = r"""
import json, sys
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
import runtime
from lmn_export.bench.footprint import loaded_files
from lmn_export.bench.timing import rss_bytes as rss

g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
warm = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                            providers=["CPUExecutionProvider"])
warm.run(None, {"x": np.zeros(1, np.float32)})
before = rss()
model = runtime.load(sys.argv[1], threads=int(sys.argv[3]), precision=sys.argv[2])
model.preload()
added = rss() - before
print(json.dumps({"rss_bytes": added, "files": loaded_files(model), "step_file": model.step_graph["file"]}))
"""


def weight_bytes(path: Path) -> int:
    """The bytes of a graph's initializers, each distinct tensor (by content) once, subgraphs included."""
    import onnx
    from onnx import numpy_helper

    seen: dict[str, int] = {}

    def visit(graph) -> None:
        for t in graph.initializer:
            data = t.raw_data or numpy_helper.to_array(t).tobytes()
            key = hashlib.sha256(data + repr((t.data_type, tuple(t.dims))).encode()).hexdigest()
            seen[key] = len(data)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(onnx.load(str(path)).graph)
    return sum(seen.values())


def loaded_files(model: runtime.ExportedModel) -> list[str]:
    """The files a model loaded at its precision may open: its stepper's and its prefill graphs', and the weights
    files they read (lmn.json graph field `weights`)."""
    graphs = {*stepper_files(model), *(g["file"] for g in model.prefill_graphs)}
    return sorted(with_weights(model.manifest.data["graphs"], graphs))


def measure_loaded(directory: Path, precision: str, threads: int) -> dict:
    """In a fresh process, the export loaded at `precision` with every graph opened: what it adds to the resident
    memory (`rss_bytes`), the graph files it may open (`files`) and its step graph's file (`step_file`)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(directory), precision, str(threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring the resident memory of {directory} at {precision} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_footprint(model: runtime.ExportedModel, threads: int, log) -> list[dict]:
    """A row per ONNX precision of a loaded export: files, weights, resident memory and their ratios to the goals."""
    rows = []
    for precision in model.manifest.precisions("onnx"):
        loaded = measure_loaded(model.directory, precision, threads)
        log(f"footprint: {precision} ({len(loaded['files'])} files)")
        weights = weight_bytes(model.directory / loaded["step_file"])
        file_bytes = sum((model.directory / f).stat().st_size for f in loaded["files"])
        ratios = {"files_vs_weights": file_bytes / weights,
                  "rss_vs_weights_and_state": loaded["rss_bytes"] / (weights + model.state_bytes)}
        limits = {"files_vs_weights": FILES_GOAL, "rss_vs_weights_and_state": RSS_GOAL}
        rows.append({"precision": precision, "files": len(loaded["files"]), "file_bytes": file_bytes,
                     "weight_bytes": weights, "state_bytes": model.state_bytes, "rss_bytes": loaded["rss_bytes"],
                     **ratios, "goals": {k: {"limit": limits[k], "met": ratios[k] <= limits[k]} for k in ratios}})
    return rows
