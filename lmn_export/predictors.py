"""Graphs under test as predictors: dicts of numpy arrays in, dicts out, as the parity checks call them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.backends import FastPathRule
from runtime.model import open_session


class OnnxPredictor:
    """An onnxruntime session called with and returning dicts of numpy arrays."""

    runner = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1):
        self.session = open_session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))


class FastPathPredictor:
    """The general step graph plus the fast paths, picked per call from the pointers as the runtime does."""

    runner = "onnxruntime"

    def __init__(self, general: OnnxPredictor, fast: dict[int, OnnxPredictor], max_levels: int):
        self.general, self.fast, self.rule = general, fast, FastPathRule.for_max_levels(max_levels)
        self.session = general.session  # inputs and outputs are the same in every graph
        self.used: dict[int, int] = {}  # levels -> calls served by that fast path

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        levels = {self.rule.levels(int(p)) for p in inputs["pointer"]}
        if len(levels) == 1 and (k := levels.pop()) in self.fast:
            self.used[k] = self.used.get(k, 0) + 1
            return self.fast[k].predict(inputs)
        return self.general.predict(inputs)
