"""A loaded export folder: the manifest, the vocabulary and one session per graph, shared by streams."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .backends import BackendError, CoreMLStepper, OnnxStepper, load_coreml_model
from .manifest import Manifest, ManifestError, read_manifest
from .vocab import Vocab

BACKENDS = ("onnxruntime", "coreml")
DEFAULT_EXPORT = Path(__file__).parent / "default"


def open_session(path: Path | str, threads: int = 1):
    """An onnxruntime CPU session: `threads` intra-op threads (1: the embedded case), all graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ExportedModel:
    """Everything one export folder holds, loaded once; create any number of streams from it."""

    def __init__(self, manifest: Manifest, threads: int = 1, backend: str = "onnxruntime",
                 unknown: str = "error", precision: str = "fp32"):
        if backend not in BACKENDS:
            raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.manifest = manifest
        self.directory = manifest.directory
        self.backend = backend
        self.threads = threads
        self.vocab = Vocab(manifest.vocab, unknown=unknown)
        self.config = manifest.model
        self._lock = threading.Lock()
        self._prefill_sessions: dict[int, object] = {}
        if backend == "coreml":
            self.step_graph = self._graph("step", "coreml")
            self._coreml = load_coreml_model(str(self.directory / self.step_graph["file"]))
        else:
            name = "step_int8" if precision == "int8" else "step"
            self.step_graph = self._graph(name, "onnx")
            self.session = self._session(self.step_graph["file"])
            # fast paths: step graphs for tokens that re-summarize exactly k levels (memory full)
            fast = "step_levels_int8" if precision == "int8" else "step_levels"
            self.fast_paths = {g["levels"]: self._session(g["file"]) for g in manifest.graphs("onnx") if g["name"] == fast}
        self.prefill_graphs = sorted(
            (g for g in manifest.graphs("onnx") if g["name"] == "prefill"), key=lambda g: g["size"]
        ) if backend == "onnxruntime" else []

    def _graph(self, name: str, target: str) -> dict:
        graph = self.manifest.graph(name, target)
        if graph is None:
            raise ManifestError(f"{self.directory} has no {target} {name} graph; re-export with lmn-export --to {target}")
        return graph

    def _session(self, file: str):
        return open_session(self.directory / file, self.threads)

    @property
    def state_bytes(self) -> int:
        return int(self.manifest.data["state_bytes_per_stream"])

    @property
    def source_sha256(self) -> str:
        return self.manifest.data.get("source", {}).get("sha256", "")

    def stepper(self):
        if self.backend == "coreml":
            return CoreMLStepper(self._coreml, self.step_graph)
        return OnnxStepper(self.session, self.step_graph, self.fast_paths, self.config.get("max_levels", 0))

    @property
    def max_prefill(self) -> int:
        return self.prefill_graphs[-1]["size"] if self.prefill_graphs else 0

    def prefill(self, ids: list[int]) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
        """Run the first tokens of a prompt in parallel from the empty state.

        Uses the smallest prefill graph that holds the prompt (or the largest, for the first
        `max_prefill` tokens of a longer one). Returns (tokens consumed, logits (V,), state).
        """
        if not self.prefill_graphs:
            raise ManifestError(f"{self.directory} has no prefill graph")
        graph = next((g for g in self.prefill_graphs if g["size"] >= len(ids)), self.prefill_graphs[-1])
        size, used = graph["size"], min(len(ids), graph["size"])
        with self._lock:
            session = self._prefill_sessions.get(size)
            if session is None:
                session = self._prefill_sessions[size] = self._session(graph["file"])
        tokens = np.zeros((1, size), dtype=np.int64)
        tokens[0, :used] = ids[:used]
        logits, memory, pointer = session.run(["logits", "memory_out", "pointer_out"],
                                              {"tokens": tokens, "length": np.array([used], dtype=np.int64)})
        return used, logits[0], {"memory": memory, "pointer": pointer}


def load(directory: Path | str | None = None, threads: int = 1, backend: str = "onnxruntime",
         unknown: str = "error", precision: str = "fp32", verify: bool = True) -> ExportedModel:
    """Load an export folder (the shipped default when None); the manifest and file hashes are checked."""
    manifest = read_manifest(directory if directory is not None else DEFAULT_EXPORT, verify_files=verify)
    return ExportedModel(manifest, threads=threads, backend=backend, unknown=unknown, precision=precision)
