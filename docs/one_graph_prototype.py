#!/usr/bin/env python
"""The first measurement of one graph per precision: the step and its fast paths merged under `If`.

    python docs/one_graph_prototype.py [EXPORT_DIR] [PRECISION] [bake|inside]   (default: runtime/default fp32)

Merges an export's general step graph and its fast paths `step_levels_0..3` at one precision into one
ONNX graph: every initializer once at the top level (deduplicated by content), each graph's nodes as a
branch of a chain of `If` nodes on an extra scalar input `path` (0..3: that fast path, 4: the general
step). Then, on one onnxruntime thread: the largest logit gap between the merged graph and the five
sessions over 300 tokens (from pointer 600, each token on the path the runtime's `FastPathRule` picks), per-token p50 and
mean over 5 interleaved rounds of 500 timed tokens each, the file bytes, and what each layout adds to
the resident memory of a process already running onnxruntime (after malloc_trim, Linux). A prototype to
decide the layout (BENCHMARKS "Footprint"), not a product path. `bake` first saves each graph as
onnxruntime's basic optimizations leave it (constant folding: the weight views onnxruntime would otherwise
fold per branch at load are folded once, in the file). `inside` keeps each branch's weights as initializers of
that branch (onnxruntime prepacks those, as it does a graph's own), so the file holds one copy per branch.
Needs the [export] install.
"""

from __future__ import annotations

import ctypes
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import runtime
from runtime.backends import FastPathRule
from runtime.model import open_session

GRAPHS = ("step_levels_0", "step_levels_1", "step_levels_2", "step_levels_3", "model")  # path 0..3, then 4


def merged_graph(models: list[onnx.ModelProto], inside: bool = False) -> onnx.ModelProto:
    """One graph: the models' initializers once at the top (`inside`: in each branch), model k as the branch taken
    when path == k."""
    first = models[0].graph
    outer = {i.name for i in first.input}
    shared: dict[str, onnx.TensorProto] = {}
    opsets: dict[str, int] = {}

    def branch(model: onnx.ModelProto, k: int) -> onnx.GraphProto:
        renamed, local = {}, []
        for t in model.graph.initializer:
            if inside:
                local.append(onnx.TensorProto())
                local[-1].CopyFrom(t)
                local[-1].name = renamed[t.name] = f"b{k}_{t.name}"
                continue
            name = "w_" + hashlib.sha256(t.SerializeToString(deterministic=True).replace(t.name.encode(), b"")).hexdigest()[:20]
            renamed[t.name] = name
            if name not in shared:
                shared[name] = onnx.TensorProto()
                shared[name].CopyFrom(t)
                shared[name].name = name
        name_of = lambda x: x if x == "" or x in outer else renamed.get(x, f"b{k}_{x}")  # noqa: E731
        nodes = []
        for node in model.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = map(name_of, node.input)
            copy.output[:] = map(name_of, node.output)
            copy.name = f"b{k}_{node.name}"
            nodes.append(copy)
        for o in model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        outputs = [helper.make_tensor_value_info(name_of(o.name), o.type.tensor_type.elem_type, None) for o in model.graph.output]
        return helper.make_graph(nodes, f"branch{k}", [], outputs, local)

    branches = [branch(m, k) for k, m in enumerate(models)]

    def chain(k: int) -> onnx.GraphProto:  # If(path == k, branch k, chain(k + 1))
        if k == len(branches) - 1:
            return branches[k]
        outs = [f"r{k}_{o.name}" for o in first.output]
        nodes = [helper.make_node("Constant", [], [f"c{k}"], value=numpy_helper.from_array(np.array(k, np.int64))),
                 helper.make_node("Equal", ["path", f"c{k}"], [f"cond{k}"]),
                 helper.make_node("If", [f"cond{k}"], outs, then_branch=branches[k], else_branch=chain(k + 1))]
        return helper.make_graph(nodes, f"chain{k}", [], [helper.make_tensor_value_info(o, t.type.tensor_type.elem_type, None)
                                                          for o, t in zip(outs, first.output)])

    nodes = list(chain(0).node)
    nodes[-1].output[:] = [o.name for o in first.output]
    inputs = list(first.input) + [helper.make_tensor_value_info("path", TensorProto.INT64, [])]
    graph = helper.make_graph(nodes, "lmn_step", inputs, list(first.output), list(shared.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = models[0].ir_version
    return model


def session(path: Path) -> ort.InferenceSession:
    return open_session(path, threads=1)  # as the runtime opens a graph


def stream(run, rule: FastPathRule, shape, tokens, start: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-token times and logits of one stream; each token on the path the runtime's rule picks (4: general)."""
    memory, pointer, times, logits = np.zeros(shape, np.float32), np.array([start], np.int64), [], []
    for token in tokens:
        feed = {"token": np.array([token], np.int64), "memory": memory, "pointer": pointer}
        levels = rule.levels(int(pointer[0]))
        t = time.perf_counter()
        out, memory, pointer = run(levels if levels is not None and levels < 4 else 4, feed)
        times.append(time.perf_counter() - t)
        logits.append(out)
    return np.array(times), logits


def resident(files: list[Path]) -> float:
    """MB that opening these sessions adds to this process (after malloc_trim)."""
    from lmn_export.bench.timing import rss_bytes

    trim = ctypes.CDLL("libc.so.6").malloc_trim
    trim(0)
    before = rss_bytes()
    sessions = [session(f) for f in files]
    trim(0)
    added = (rss_bytes() - before) / 1e6
    del sessions
    trim(0)
    return added


def baked(path: Path, directory: Path) -> Path:
    """The graph as onnxruntime's basic (provider-independent) optimizations leave it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(directory / path.name)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return directory / path.name


def main(directory: Path, precision: str, bake: bool, inside: bool = False) -> None:
    suffix = "" if precision == "fp32" else f".{precision}"
    files = [directory / f"{name}{suffix}.onnx" for name in GRAPHS]
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged.onnx"
        sources = [baked(f, Path(tmp)) for f in files] if bake else files
        onnx.save(merged_graph([onnx.load(str(f)) for f in sources], inside), str(merged))
        session(directory / "model.onnx")  # onnxruntime's own set-up, before any memory is measured
        separate_mb, merged_mb = resident(files), resident([merged])
        sessions, one = [session(f) for f in files], session(merged)
        shape = [1] + [int(d) for d in sessions[4].get_inputs()[1].shape[1:]]
        rule = FastPathRule.from_manifest(runtime.load(directory).manifest.fast_paths)
        runs = {"five sessions": lambda k, feed: sessions[k].run(None, feed),
                "one merged graph": lambda k, feed: one.run(None, {**feed, "path": np.array(k, np.int64)})}
        tokens = np.random.default_rng(0).integers(0, 60, 600)
        _, a = stream(runs["five sessions"], rule, shape, tokens[:300], 600)
        _, b = stream(runs["one merged graph"], rule, shape, tokens[:300], 600)
        gap = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
        times = {name: [] for name in runs}
        for _ in range(5):
            for name, run in runs.items():
                times[name].append(stream(run, rule, shape, tokens, 600)[0][100:])
        print(f"{directory} {precision}{' (baked)' if bake else ''}{' (weights inside branches)' if inside else ''}: max |logit gap| merged vs five sessions over 300 tokens: {gap:.3g}")
        shared = directory / f"weights.{precision}.bin"  # the weights file the five graphs share (manifest format 4)
        sizes = {"five sessions": sum(f.stat().st_size for f in files) + (shared.stat().st_size if shared.exists() else 0),
                 "one merged graph": merged.stat().st_size}
        memory = {"five sessions": separate_mb, "one merged graph": merged_mb}
        for name, samples in times.items():
            us = np.concatenate(samples) * 1e6
            print(f"  {name:<17} p50 {np.median(us):7.1f} us  mean {us.mean():7.1f} us  files {sizes[name] / 1e6:6.2f} MB  "
                  f"resident +{memory[name]:5.1f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runtime/default"), sys.argv[2] if len(sys.argv) > 2 else "fp32",
         len(sys.argv) > 3 and sys.argv[3] == "bake", len(sys.argv) > 3 and sys.argv[3] == "inside")
