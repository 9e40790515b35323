"""A loaded export folder: the manifest, the vocabulary and one session per graph, shared by streams."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .backends import ORT_DTYPES, BackendError, CoreMLStepper, FastPathRule, OnnxStepper, empty_state, load_coreml_model
from .manifest import MANIFEST, Manifest, ManifestError, graph_label, precision_of, read_manifest, role_name, state_input
from .vocab import Vocab, make_vocab

BACKENDS = ("onnxruntime", "coreml")
PRECISIONS = ("fp32", "int8", "int4", "dynamic-int8")  # the ONNX graph sets an export may hold (lmn-export --quantize)
DEFAULT_EXPORT = Path(__file__).parent / "default"  # what lmn-chat and runtime.load() open with no folder
SMALL_EXPORT = Path(__file__).parent / "logmem-32"  # the small shipped export (LogMem-32): tests, quick runs
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def check_load_arguments(threads, backend, unknown, precision, verify) -> None:
    """Validate `load`'s arguments; a ValueError says what is allowed."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "coreml" and precision == "dynamic-int8":
        raise ValueError("dynamic-int8 is an ONNX graph set; the Core ML backend runs fp32 (or the export's fp16), int8 or int4")
    if not isinstance(verify, bool):
        raise ValueError(f"verify must be True or False, got {verify!r}")
    Vocab.check_policy(unknown)


def check_io(session, graph: dict, path: Path) -> None:
    """The session's inputs and outputs are the ones the manifest declares: names, dtypes, shapes."""
    for kind, declared, actual in (("inputs", graph["inputs"], session.get_inputs()),
                                   ("outputs", graph["outputs"], session.get_outputs())):
        want = [(t["name"], t["dtype"], ["batch" if d == "batch" else d for d in t["shape"]]) for t in declared]
        got = [(a.name, ORT_TYPES.get(a.type, a.type), [d if isinstance(d, int) else "batch" for d in a.shape])
               for a in actual]
        if sorted(want, key=str) != sorted(got, key=str):
            raise ManifestError(f"{path} has {kind} {got}, but {MANIFEST} declares {want}; "
                                "the folder mixes files of different exports: re-export it")


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
        check_load_arguments(threads, backend, unknown, precision, True)
        self.manifest = manifest
        self.directory = manifest.directory
        self.backend = backend
        self.threads = threads
        self.vocab = make_vocab(manifest.vocab_kind, manifest.vocab, unknown=unknown)
        self.start_ids: list[int] = list(manifest.vocabulary["start"]["ids"])  # fed before generating from nothing
        self.config = manifest.model
        self.precision = precision
        self._lock = threading.Lock()
        self._prefill_runners: dict[int, object] = {}
        self.fast_path_graphs, self.fast_paths = {}, {}
        if backend == "coreml":  # "fp32": the export's unquantized Core ML step (fp32 or fp16 compute)
            wanted = ("fp32", "fp16") if precision == "fp32" else (precision,)
            found = [g for g in manifest.graphs("coreml", "step") if precision_of(g) in wanted]
            if not found:
                raise ManifestError(f"{self.directory} has no {precision} Core ML step graph; re-export with lmn-export --to coreml"
                                    + (f" --quantize {precision}" if precision != "fp32" else ""))
            self.step_graph = found[0]
            self._coreml = load_coreml_model(str(self.directory / self.step_graph["file"]), self.step_graph.get("function"))
        else:  # graphs chosen by their manifest fields (name, precision, levels, size), never by file name
            self.step_graph = manifest.graph("step", "onnx", precision)
            if self.step_graph is None:
                have = manifest.precisions("onnx")
                how = f"--quantize {precision}" if precision != "fp32" else "--to onnx"
                raise ManifestError(f"{self.directory} has no {precision} ONNX graphs (it has "
                                    f"{', '.join(have) or 'none'}); re-export with lmn-export {how}")
            refuse_saturating_weights(self.directory, self.step_graph)
            self.session = self._session(self.step_graph)
            # fast paths: step graphs for tokens that re-summarize exactly k levels (memory full)
            self.fast_path_graphs = {g["levels"]: g for g in manifest.graphs("onnx", "step_levels", precision)}
            self.fast_paths = {k: self._session(g) for k, g in self.fast_path_graphs.items()}
        # prefill: per size, this precision's graph where the export has one, else the fp32 one (Core ML: the
        # graphs of the step's own precision, fp32 or fp16 compute)
        if backend == "coreml":
            prefill = {g["size"]: g for g in manifest.graphs("coreml", "prefill")
                       if precision_of(g) == precision_of(self.step_graph)}
        else:
            prefill = {g["size"]: g for g in manifest.graphs("onnx", "prefill", "fp32")}
            prefill.update({g["size"]: g for g in manifest.graphs("onnx", "prefill", precision)})
        self.prefill_graphs = [prefill[size] for size in sorted(prefill)]
        # the largest input pointer every step graph this model runs supports (their `pointer_max`)
        self.pointer_max = min(int(g["pointer_max"]) for g in [self.step_graph, *self.fast_path_graphs.values()])
        self.pointer_input = state_input(self.step_graph, "pointer")  # the step graph's input carrying the pointer

    def _session(self, graph: dict):
        """A session for a manifest graph, its I/O checked against the manifest before anything runs."""
        path = self.directory / graph["file"]
        try:
            session = open_session(path, self.threads)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ManifestError(f"onnxruntime cannot load {path} ({str(e).splitlines()[0]}); re-export the model") from None
        check_io(session, graph, path)
        return session

    @property
    def state_bytes(self) -> int:
        return int(self.manifest.data["state"]["bytes_per_stream"])

    @property
    def source_sha256(self) -> str:
        return self.manifest.data.get("source", {}).get("sha256", "")

    def stepper(self):
        if self.backend == "coreml":
            return CoreMLStepper(self._coreml, self.step_graph)
        files = {k: g["file"] for k, g in self.fast_path_graphs.items()}
        rule = FastPathRule.from_manifest(self.manifest.fast_paths) if self.fast_paths else None
        return OnnxStepper(self.session, self.step_graph, self.fast_paths, rule, files)

    @property
    def max_prefill(self) -> int:
        return self.prefill_graphs[-1]["size"] if self.prefill_graphs else 0

    def prefill_graph(self, count: int) -> dict:
        """The prefill graph for `count` tokens: the smallest that holds them, else the largest."""
        return next((g for g in self.prefill_graphs if g["size"] >= count), self.prefill_graphs[-1])

    def prefill(self, ids: list[int], state: dict[str, np.ndarray]) -> tuple[int, np.ndarray, dict[str, np.ndarray], str]:
        """Run the first tokens of `ids` in parallel from `state` (a stream's state, keyed by the step graph's
        inputs, batch 1; lmn.json `prefill`).

        Uses `prefill_graph(len(ids))`: all of `ids`, or the first `max_prefill` of a longer run. Returns
        (tokens consumed, logits (V,), the state after them, graph file). The graph cannot check `length`
        (1..size), the token ids or the state: they are checked here first (a ValueError, nothing run).
        """
        if not self.prefill_graphs:
            raise ManifestError(f"{self.directory} has no prefill graph")
        vocab_size = self.manifest.vocabulary["size"]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if not ids or bad:
            raise ValueError(f"prefill takes 1 or more token ids in [0, {vocab_size}); got {len(ids)} ids, "
                             f"out of range: {bad[:5]}")
        graph = self.prefill_graph(len(ids))
        size, used = graph["size"], min(len(ids), graph["size"])
        self.check_state(state, used)
        with self._lock:
            run = self._prefill_runners.get(size)
            if run is None:
                run = self._prefill_runners[size] = self._prefill_runner(graph)
        dtypes = {t["name"]: ORT_DTYPES[t["dtype"]] for t in graph["inputs"]}
        tokens, length = role_name(graph["inputs"], "tokens"), role_name(graph["inputs"], "length")
        inputs = {tokens: np.full((1, size), self.manifest.data["prefill"]["padding_id"], dtype=dtypes[tokens]),
                  length: np.array([used], dtype=dtypes[length]),
                  **{pair["input"]: np.asarray(state[state_input(self.step_graph, pair["tensor"])], dtype=dtypes[pair["input"]])
                     for pair in graph["state"]}}
        inputs[tokens][0, :used] = ids[:used]
        out = run(inputs)
        after = {state_input(self.step_graph, pair["tensor"]): out[pair["output"]] for pair in graph["state"]}
        return used, np.asarray(out[role_name(graph["outputs"], "logits")], dtype=np.float32)[0], after, graph_label(graph)

    def check_state(self, state: dict[str, np.ndarray], count: int) -> None:
        """`state` is one stream's state of this model (the step graph's state inputs: names, batch-1 shapes, dtypes)
        from which `count` more tokens fit under `pointer_max`; a one-line ValueError otherwise."""
        want = empty_state(self.step_graph)
        if not isinstance(state, dict) or set(state) != set(want):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"a starting state holds the arrays {sorted(want)} (the step graph's state inputs), got {got}")
        for name, empty in want.items():
            value = state[name]
            if not isinstance(value, np.ndarray) or value.shape != empty.shape or value.dtype != empty.dtype:
                got = (value.shape, str(value.dtype)) if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"the starting state's {name} must be {empty.dtype} of shape {empty.shape}, got {got}")
        pointer = int(state[self.pointer_input][0])
        if not 0 <= pointer <= self.pointer_max - count + 1:
            raise ValueError(f"the starting pointer {pointer} is outside [0, {self.pointer_max - count + 1}] "
                             f"({count} tokens must end at or below pointer_max {self.pointer_max})")

    def preload(self) -> None:
        """Open every graph this model may run now; the prefill graphs are otherwise opened on first use."""
        with self._lock:
            for graph in self.prefill_graphs:
                if graph["size"] not in self._prefill_runners:
                    self._prefill_runners[graph["size"]] = self._prefill_runner(graph)

    def _prefill_runner(self, graph: dict):
        """inputs -> outputs (dicts by name) of a prefill graph: an onnxruntime session, or Core ML's MLModel (macOS)."""
        if self.backend == "coreml":
            mlmodel = load_coreml_model(str(self.directory / graph["file"]), graph.get("function"))
            return lambda inputs: mlmodel.predict(inputs)
        session = self._session(graph)
        names = [o.name for o in session.get_outputs()]
        return lambda inputs: dict(zip(names, session.run(names, inputs)))


def refuse_saturating_weights(directory: Path, graph: dict) -> None:
    """A dynamic-int8 graph with int8 (signed) weights, as lmn-export wrote them before uint8: onnxruntime's
    u8s8 kernels saturate on x86 without VNNI (logit gaps 1.1 to 4.5 on the shipped model), and its Arm
    SME kernel (qemu `max`) returned garbage (5% argmax agreement); the same graphs are right elsewhere,
    so nothing at run time would notice. Refused, whatever this CPU is (BENCHMARKS.md, "Edge CPUs")."""
    quantization = graph.get("quantization") or {}
    if quantization.get("kind") == "dynamic" and str(quantization.get("weights", "")).startswith("int8"):
        raise ManifestError(f"{directory}'s dynamic-int8 graphs have int8 weights, which onnxruntime computes wrongly "
                            "on x86 without VNNI and on Arm SME; re-export with this lmn's lmn-export (uint8 weights) "
                            "or load another precision")


def load(directory: Path | str | None = None, threads: int = 1, backend: str = "onnxruntime",
         unknown: str = "error", precision: str = "fp32", verify: bool = True) -> ExportedModel:
    """Load an export folder (the shipped default when None).

    Checked before anything runs: the arguments, the manifest (its own sha256, format, fields),
    every file's sha256 (`verify`), and each graph's inputs and outputs against the manifest.
    """
    check_load_arguments(threads, backend, unknown, precision, verify)
    manifest = read_manifest(directory if directory is not None else DEFAULT_EXPORT, verify_files=verify)
    return ExportedModel(manifest, threads=threads, backend=backend, unknown=unknown, precision=precision)
