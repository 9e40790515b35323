"""One copy of the weights that several step graphs hold: `shared_weights.npz` beside them.

The runtime picks among several step graphs per token (the fast paths); each onnxruntime session
would otherwise keep (and prepack) its own copy of every weight, and switching graphs every token
then misses the CPU caches. The export stores each distinct weight array once, keyed by content,
and lists per graph which initializer is which array; the runtime (numpy only) loads the file
once and hands the same buffers to every session. The graph files still embed their weights, so
each stays usable on its own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

FILE = "shared_weights.npz"
MIN_ELEMENTS = 256  # smaller initializers (shapes, scales) are not worth sharing


def write_shared_weights(directory: Path, graph_files: list[str]) -> dict[str, dict[str, str]]:
    """Write FILE with the distinct large initializers of `graph_files`; returns {file: {initializer: key}}."""
    import onnx
    from onnx import numpy_helper

    arrays: dict[str, np.ndarray] = {}
    index: dict[str, dict[str, str]] = {}
    for name in graph_files:
        index[name] = {}
        for init in onnx.load(str(directory / name)).graph.initializer:
            array = numpy_helper.to_array(init)
            if array.size < MIN_ELEMENTS or array.dtype not in (np.float32, np.int8, np.uint8):
                continue
            key = f"{array.dtype}_{'x'.join(map(str, array.shape))}_{hashlib.sha256(array.tobytes()).hexdigest()[:16]}"
            arrays.setdefault(key, np.ascontiguousarray(array))
            index[name][init.name] = key
    with open(directory / FILE, "wb") as f:
        np.savez(f, **dict(sorted(arrays.items())))
    return index
