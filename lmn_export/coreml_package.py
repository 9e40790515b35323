"""One Core ML package for the step and the prefill graphs: a multifunction .mlpackage (iOS 18 / macOS 15).

The export converts and checks each graph as its own single-function package; `combine_functions` then
saves them as the functions of one package (coremltools' `save_multifunction`, which stores each distinct
weight once) and checks that every function holds exactly the program that passed parity: the same
operations in the same order, each constant with the same values. The single-function packages it read
are removed (they lie in the export's staging folder, written by this export).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from .coreml_export import DEPLOYMENT, _coremltools
from .coreml_run import load_program
from .onnx_export import ExportError

PACKAGE = "model.mlpackage"
MULTIFUNCTION_TARGET = "iOS18"  # the first Core ML target that reads multifunction packages


def function_name(entry: dict) -> str:
    """A graph's function in the package: `step`, or `prefill_<size>`."""
    return entry["name"] if entry["name"] != "prefill" else f"prefill_{entry['size']}"


def program_digest(function) -> list[tuple]:
    """A MIL function as written: each operation's type and output dtypes, each constant's values (sha256)."""
    ops = []
    for op in function.operations:
        outputs = tuple(str(v.dtype) for v in op.outputs)
        value = op.outputs[0].val if op.op_type == "const" else None
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest() if value is not None else None
        ops.append((op.op_type, outputs, digest))
    return ops


def _functions(path: Path) -> dict:
    ct = _coremltools()
    return load_program(ct.models.MLModel(str(path), skip_model_load=True)).functions


def combine_functions(work: Path, entries: list[dict], progress) -> None:
    """Save the single-function packages of `entries` (files in `work`) as the functions of one package,
    PACKAGE, check each function against its source, remove the sources and point the entries at it."""
    ct = _coremltools()
    sources = {function_name(e): work / e["file"] for e in entries}
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, source in sources.items():
        descriptor.add_function(str(source), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = "step"
    combined = work / f".combined-{PACKAGE}"
    progress(f"saving the Core ML graphs as one package ({', '.join(sources)})")
    ct.utils.save_multifunction(descriptor, str(combined))
    functions = _functions(combined)
    for name, source in sources.items():
        if name not in functions or program_digest(functions[name]) != program_digest(_functions(source)["main"]):
            raise ExportError(f"the combined Core ML package's function {name!r} is not the program that passed parity")
    for source in sources.values():
        shutil.rmtree(source)
    combined.rename(work / PACKAGE)
    for entry in entries:
        entry.update(file=PACKAGE, function=function_name(entry), minimum_deployment_target=DEPLOYMENT[MULTIFUNCTION_TARGET])
