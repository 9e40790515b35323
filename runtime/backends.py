"""Step executors: one per stream, sharing the loaded model's session.

A stepper owns one stream's state buffers. The onnxruntime stepper binds them once as OrtValues
that share memory with numpy arrays and ping-pongs between two sets (inputs A -> outputs B, then
B -> A), so a step copies no state: it writes one token id and reads the logits buffer.

An LMN export may also hold fast paths: step graphs that compute only the k summary levels a
token at a given pointer re-summarizes once the memory is full (lmn.json `fast_paths`, as
`FastPathRule`). The stepper binds the same buffers to each and picks the graph from the
pointer, else the general graph.
"""

from __future__ import annotations

import platform
from collections import Counter

import numpy as np

from .manifest import graph_label, role_tensor, state_input

ORT_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class BackendError(RuntimeError):
    """A backend that cannot run here; the message says what to use instead."""


def empty_state(graph: dict, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero state for a step graph's state inputs (the empty stream at pointer 0)."""
    inputs = {t["name"]: t for t in graph["inputs"]}
    state = {}
    for s in graph["state"]:
        t = inputs[s["input"]]
        shape = [batch if d == "batch" else d for d in t["shape"]]
        state[s["input"]] = np.zeros(shape, dtype=ORT_DTYPES[t["dtype"]])
    return state


FULL_MEMORY_FAST_PATH_LEVELS = 12  # up to this many levels the memory fills within 2,047 tokens


def fast_paths_mask_empty_slots(max_levels: int) -> bool:
    """Whether lmn-export traces a model's fast paths with the empty slots masked (valid from pointer 0), as
    it does for a memory deeper than FULL_MEMORY_FAST_PATH_LEVELS, which would otherwise run the general
    step for its first 2^(max_levels-1) - 1 tokens (a million at 21 levels)."""
    return max_levels > FULL_MEMORY_FAST_PATH_LEVELS


class FastPathRule:
    """lmn.json `fast_paths` as code: the step_levels graph a step at input pointer p may take."""

    def __init__(self, valid_from_pointer: int, levels_cap: int):
        self.valid_from_pointer, self.levels_cap = valid_from_pointer, levels_cap

    @classmethod
    def from_manifest(cls, section: dict) -> "FastPathRule":
        return cls(int(section["valid_from_pointer"]), int(section["levels_cap"]))

    @classmethod
    def for_max_levels(cls, max_levels: int) -> "FastPathRule":
        """The rule lmn-export writes for a model of `max_levels` levels: from pointer 2^(max_levels-1) - 1, where
        the memory is full, for fast paths that assume it full; from pointer 0 for fast paths that mask the
        empty slots (`fast_paths_mask_empty_slots`)."""
        if fast_paths_mask_empty_slots(max_levels):
            return cls(0, max_levels - 1)
        return cls((1 << (max_levels - 1)) - 1, max_levels - 1)

    def levels(self, pointer: int) -> int | None:
        """min(trailing zeros of pointer + 1, levels_cap) once pointer >= valid_from_pointer, else None (general step)."""
        if pointer < self.valid_from_pointer:
            return None
        lowest = (pointer + 1) & -(pointer + 1)
        return min(lowest.bit_length() - 1, self.levels_cap)


class OnnxStepper:
    """One stream (batch 1) on an onnxruntime step session, through IO binding.

    fast_paths: {k: session} of step graphs valid where `rule` (lmn.json `fast_paths`) gives k
    levels (manifest graphs "step_levels"); fast_files: {k: file name}, the labels `calls` counts
    the fast paths under. `calls` counts the steps each graph ran, by file name: proof of which
    graph did the work. Tensors are bound by their manifest roles, never by name.
    """

    def __init__(self, session, graph: dict, fast_paths: dict[int, object] | None = None,
                 rule: FastPathRule | None = None, fast_files: dict[int, str] | None = None):
        import onnxruntime as ort

        self.calls: Counter[str] = Counter()
        self.session = session
        self.graph = graph
        self.rule = rule
        self.pairs = [(s["input"], s["output"]) for s in graph["state"]]
        token_spec = role_tensor(graph["inputs"], "token")
        self.token_dtype = ORT_DTYPES[token_spec["dtype"]]
        self.token = np.zeros(1, dtype=self.token_dtype)
        logits_spec = role_tensor(graph["outputs"], "logits")
        self.logits = np.zeros((1, logits_spec["shape"][1]), dtype=np.float32)
        self.buffers = [empty_state(graph), empty_state(graph)]  # ping-pong state sets
        self.current = 0
        values = lambda arrays: {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}  # noqa: E731
        token_value, logits_value = ort.OrtValue.ortvalue_from_numpy(self.token), ort.OrtValue.ortvalue_from_numpy(self.logits)
        ort_sets = [values(b) for b in self.buffers]

        def bind(session, label):  # [binding reading set 0, binding reading set 1], each with its label
            bindings = []
            for src, dst in ((0, 1), (1, 0)):
                binding = session.io_binding()
                binding.bind_ortvalue_input(token_spec["name"], token_value)
                for name, out in self.pairs:
                    binding.bind_ortvalue_input(name, ort_sets[src][name])
                    binding.bind_ortvalue_output(out, ort_sets[dst][name])
                binding.bind_ortvalue_output(logits_spec["name"], logits_value)
                bindings.append((session, binding, label))
            return bindings

        fast_files = fast_files or {}
        self.bindings = bind(session, graph.get("file", "step"))
        self.fast = {k: bind(s, fast_files.get(k, f"step_levels_{k}")) for k, s in (fast_paths or {}).items()}
        self.pointers = [b[state_input(graph, "pointer")] for b in self.buffers]

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current state arrays (live views; copy before keeping them)."""
        return self.buffers[self.current]

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        for name, value in state.items():
            np.copyto(self.buffers[self.current][name], value, casting="same_kind")

    @property
    def pointer(self) -> int:
        """The input pointer of the next step."""
        return int(self.pointers[self.current][0])

    def step(self, token: int) -> np.ndarray:
        """Feed one token id; returns the logits (V,) (a view, valid until the next step)."""
        self.token[0] = token
        bindings = self.bindings
        if self.fast:
            bindings = self.fast.get(self.rule.levels(self.pointer), bindings)
        session, binding, label = bindings[self.current]
        session.run_with_iobinding(binding)
        self.calls[label] += 1
        self.current ^= 1
        return self.logits[0]


class CoreMLStepper:
    """One stream through Core ML's `MLModel.predict` (macOS only), explicit fp32 state I/O."""

    def __init__(self, mlmodel, graph: dict):
        self.model = mlmodel
        self.graph = graph
        self.pairs = [(s["input"], s["output"]) for s in graph["state"]]
        self.token = role_tensor(graph["inputs"], "token")
        self.token_dtype = ORT_DTYPES[self.token["dtype"]]
        self.logits = role_tensor(graph["outputs"], "logits")["name"]
        self.pointer_input = state_input(graph, "pointer")
        self._state = empty_state(graph)
        self.calls: Counter[str] = Counter()

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self._state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        for name, value in state.items():
            self._state[name] = np.asarray(value, dtype=self._state[name].dtype).copy()

    def step(self, token: int) -> np.ndarray:
        out = self.model.predict({self.token["name"]: np.array([token], dtype=self.token_dtype), **self._state})
        self.calls[graph_label(self.graph) if "file" in self.graph else "step"] += 1
        self._state = {name: np.asarray(out[o], dtype=self._state[name].dtype) for name, o in self.pairs}
        return np.asarray(out[self.logits], dtype=np.float32)[0]

    @property
    def pointer(self) -> int:
        return int(self._state[self.pointer_input][0])


def load_coreml_model(path: str, function: str | None = None):
    """The Core ML model at `path` (`function`: that function of a multifunction package), or a BackendError
    off macOS; a package without `function` is a ManifestError."""
    if platform.system() != "Darwin":
        raise BackendError(
            f"the Core ML backend runs only on macOS (this is {platform.system()}); "
            "use backend='onnxruntime' here, or run on a Mac"
        )
    try:
        import coremltools as ct
    except ImportError:
        raise BackendError("the Core ML backend needs coremltools: pip install coremltools") from None
    if function is not None:
        from .manifest import ManifestError

        have = [f.name for f in ct.utils.load_spec(path).description.functions]
        if function not in have:
            raise ManifestError(f"{path} has no Core ML function {function!r} (it has {', '.join(have) or 'none'}); "
                                "the folder mixes files of different exports: re-export it")
    return ct.models.MLModel(path, compute_units=ct.ComputeUnit.ALL, function_name=function)
