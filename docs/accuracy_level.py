#!/usr/bin/env python
"""Weight-only int4/int8 step graphs with and without MatMulNBits accuracy_level 4, timed side by side.

    python docs/accuracy_level.py [EXPORT_DIR]      (default: the shipped runtime/default)

Quantizes the export's fp32 step graph (every weight, no repair) to int4 and int8 with
accuracy_level unset (fp32 compute on dequantized weights) and 4 (inputs rounded to int8 per block,
int8 products), then times each with fp32 and the export's own quantized steps: one onnxruntime
thread, the runtime's IO-binding stepper, 600 tokens to fill the memory, then 20 rounds of 100
tokens per variant, variants interleaved round by round (2,000 timed steps each), so a slow phase
of a shared machine lands on every variant alike. Also prints each variant's next-token agreement
with fp32 on the 512-token parity text. Needs the [export] install.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import runtime
from lmn_export.export import OnnxPredictor
from lmn_export.parity_text import SAMPLE
from lmn_export.graphs import GraphSpec
from lmn_export.quantize import GATES, stream_report
from lmn_export.quantize_graph import quantize_weight_only
from runtime.backends import OnnxStepper
from runtime.model import open_session


def main(directory: Path) -> None:
    model = runtime.load(directory)
    step = directory / model.step_graph["file"]
    variants = {"fp32": step}
    for precision in ("dynamic-int8", "int8", "int4"):  # the export's own (int4/int8: repaired, if need be)
        graph = model.manifest.graph("step", "onnx", precision)
        if graph is not None:
            variants[f"{precision} (this export)"] = directory / graph["file"]
    with tempfile.TemporaryDirectory() as scratch:
        for precision in ("int4", "int8"):
            for level in (None, 4):
                path = Path(scratch) / f"{precision}-{level}.onnx"
                quantize_weight_only(step, path, precision, 32, accuracy_level=level)
                variants[f"{precision} accuracy_level={level}"] = path
        ids = model.vocab.encode(SAMPLE)
        fp32, spec = OnnxPredictor(step), GraphSpec.from_dict(model.step_graph)
        agreement = {name: stream_report(fp32, OnnxPredictor(path), spec, ids, 512, GATES["int4"], name).extra["agreement"]
                     for name, path in variants.items()}
        steppers = {name: OnnxStepper(open_session(path, 1), model.step_graph) for name, path in variants.items()}
        drive = np.random.default_rng(0).integers(0, len(model.vocab), 600 + 2000).tolist()
        for stepper in steppers.values():
            for token in drive[:600]:
                stepper.step(token)
        samples = {name: [] for name in steppers}
        for r in range(20):
            chunk = drive[600 + 100 * r: 600 + 100 * (r + 1)]
            for name, stepper in steppers.items():
                for token in chunk:
                    start = time.perf_counter_ns()
                    stepper.step(token)
                    samples[name].append(time.perf_counter_ns() - start)
    print("| step graph | p50 µs | mean µs | agreement with fp32 |\n|---|---:|---:|---:|")
    for name, ns in samples.items():
        us = np.asarray(ns) / 1000
        print(f"| {name} | {np.median(us):.1f} | {us.mean():.1f} | {agreement[name]:.1%} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else runtime.DEFAULT_EXPORT)
