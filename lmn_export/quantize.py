"""Quantized copies of the ONNX graphs, each precision judged against the fp32 graphs on real text.

Precisions (`--quantize`, any of them; each one's graphs are written beside the fp32 ones as
`<stem>.<precision>.onnx`, with the same manifest `name`, `levels`, `size` and a `precision` field):

- int4, int8, weight-only: every constant weight matrix of a MatMul becomes onnxruntime's
  MatMulNBits (a Gemm, which the quantizer skips, is first rewritten as MatMul + Add), and the
  embedding table of a Gather becomes GatherBlockQuantized (uint8 storage, packed for 4 bits).
  Blocks of `--quant-block` weights along the input dimension, round to nearest with a scale and a
  zero point per block (onnxruntime's DefaultWeightOnlyQuantConfig, asymmetric: "rtn").
  accuracy_level 4: MatMulNBits quantizes its input to int8 per block and multiplies in int8;
  without it an int8 step of the shipped model ran 3.5x slower (594 vs 169 us, BENCHMARKS.md).
  Activations, biases, norms, the memory state and the attention over it stay fp32.
- dynamic-int8: onnxruntime's quantize_dynamic, for the step and the fast paths: weights uint8 with
  one scale and zero point per output channel, activations quantized to uint8 per call. Unsigned
  weights on purpose: onnxruntime's u8s8 (int8-weight) kernels on x86 without VNNI (AVX2, AVX-512F)
  add pairs of u8 x s8 products in 16 bits (vpmaddubsw), which saturates; u8u8 widens to 16 bits
  first and is exact on every kernel path, so every CPU computes the same integers. Measured on the
  shipped LogMem-32 step, 1,000 parity characters against fp32 (host AVX-512 VNNI / qemu-x86_64
  -cpu Haswell, AVX2 only): int8 weights 97.6% / 96.5% argmax agreement, max logit gap 1.04 / 4.5;
  int8 per channel 98.7% / 82.0%, 1.02 / 9.84; int8 with reduce_range (7-bit weights) 95.5% / 95.5%,
  1.63 / 1.63; uint8 per channel 98.2% / 98.2%, 0.847 / 0.847 (identical on both).

Each precision's graph set is judged like the export's other graphs, with its own gate (`GATES`):
the step graph from pointer 0, the fast paths from a pointer where they run, and each prefill graph
(its state, continued by the fp32 step) stream the parity text next to the fp32 graphs; next-token
agreement and the increase of the mean loss (nats per token) must meet the gate, NaN never passes.

A weight-only precision that fails its gate (or passes it by less than HEADROOM) is repaired where
it is weakest: the weights are ranked by the divergence each one alone causes (KL from the fp32
next-token distribution), and moved up one step (4 -> 8 bits, 8 -> fp32) in that order until every
graph of the set passes with that headroom; the manifest lists the weights so moved
(`quantization.moved_up`), and a set that fails its gate at the end fails the export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.atomic import atomic_path, write_atomic
from .graphs import GraphSpec
from .predictors import FastPathPredictor, OnnxPredictor
from .streaming import stream_logits
from .validate import PREFILL_WARMUP, START_POINTERS, OutputDiff, ParityReport

QUANTIZE_CHOICES = ("int4", "int8", "dynamic-int8")
DEFAULT_QUANT_BLOCK = 32
QUANT_BLOCKS = (16, 32, 64, 128, 256)  # the block sizes onnxruntime's MatMulNBits kernels run
BITS = {"int4": 4, "int8": 8}
FALLBACK = {4: 8, 8: None}  # where a weight goes when its precision fails the gate (None: stays fp32)
METHOD = "rtn"
ACCURACY_LEVEL = 4
WEIGHT_OPS = ("MatMul", "Gemm", "Gather")  # the ops whose constant 2-D float input is a weight matrix


@dataclass(frozen=True)
class Gate:
    min_agreement: float  # next-token agreement with the fp32 graphs
    max_loss_increase: float  # nats per token over the fp32 graphs' loss on the same text


GATES = {"int8": Gate(0.98, 0.01), "int4": Gate(0.90, 0.05), "dynamic-int8": Gate(0.90, 0.05)}
# What a repair (below) aims for, inside the gate: onnxruntime's int8 kernels round differently per
# instruction set (AVX2, AVX-512 VNNI, NEON), which can tip a near-tie on another machine; a set that
# only just passes here is repaired until it passes by this much (the gate itself stays as above).
HEADROOM = Gate(min_agreement=0.01, max_loss_increase=0.2)  # + 1 point of agreement; 20% of the loss budget


# What MatMulNBits does with its activations, by accuracy_level: a client with another int8 kernel
# (or none) computes something else, so lmn.json says it (quantization.activations).
ACTIVATIONS = {4: "int8, quantized at run time per block of the input row (MatMulNBits accuracy_level 4)",
               0: "fp32 (MatMulNBits accuracy_level 0: dequantized weights, fp32 compute)",
               1: "fp32 (MatMulNBits accuracy_level 1)"}

def quantized_name(file: str, precision: str) -> str:
    """`model.onnx` -> `model.int4.onnx` (the manifest, not this name, says what a file is)."""
    return f"{file.removesuffix('.onnx')}.{precision}.onnx"


# ---- judging -------------------------------------------------------------------------------------

def _stream(predictor, spec: GraphSpec, ids: list[int], start: int = 0, state: dict | None = None) -> np.ndarray:
    """Logits (T, V) of one row fed `ids` from `state` (default: zero memory at pointer `start`)."""
    return stream_logits(predictor, spec, ids, start, state)[0]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _cross_entropy(logits: np.ndarray, targets: list[int]) -> float:
    return float(-_log_softmax(logits)[np.arange(len(targets)), targets].mean())


def compare(want: np.ndarray, got: np.ndarray, targets: list[int], gate: Gate, graph: str, start: int = 0) -> ParityReport:
    """Judge quantized logits `got` against fp32 `want` (both (T, V), predicting `targets`) by the gate."""
    finite = bool(np.isfinite(want).all() and np.isfinite(got).all())
    agreement = float((want.argmax(-1) == got.argmax(-1)).mean()) if finite else 0.0
    loss_fp32, loss_q = _cross_entropy(want, targets), _cross_entropy(got, targets)
    increase = max(0.0, loss_q - loss_fp32) if finite else math.inf  # NaN logits fail, never pass
    kl = float((np.exp(_log_softmax(want)) * (_log_softmax(want) - _log_softmax(got))).sum(-1).mean()) if finite else math.inf
    report = ParityReport(graph, "onnxruntime", len(targets), 1, [start], [
        OutputDiff("next_token_disagreement", 1 - agreement, 1 - gate.min_agreement),
        OutputDiff("loss_increase_nats", increase, gate.max_loss_increase),
    ])
    report.extra = {"agreement": agreement, "finite": finite,
                    **{k: v if math.isfinite(v) else None for k, v in (
                        ("loss_fp32", loss_fp32), ("loss_quantized", loss_q), ("kl_nats", kl),
                        ("max_logit_diff", float(np.abs(want - got).max()) if finite else math.inf))}}
    return report


def text_window(text_ids: list[int], tokens: int) -> list[int]:
    """The first tokens + 1 ids of the text (wrapping around a shorter one): `tokens` predictions."""
    return [int(i) for i in np.resize(np.asarray(text_ids, dtype=np.int64), tokens + 1)]


def stream_report(fp32, quantized, spec: GraphSpec, text_ids: list[int], tokens: int, gate: Gate, graph: str,
                  start: int = 0, want: np.ndarray | None = None) -> ParityReport:
    """Stream `tokens` tokens of the text through both step predictors (I/O `spec`) from pointer `start` and
    judge by `gate`."""
    ids = text_window(text_ids, tokens)
    want = _stream(fp32, spec, ids[:-1], start) if want is None else want
    return compare(want, _stream(quantized, spec, ids[:-1], start), ids[1:], gate, graph, start)


def prefill_report(fp32_step, spec: GraphSpec, prefill, size: int, text_ids: list[int], tokens: int, gate: Gate,
                   graph: str, want: np.ndarray | None = None) -> ParityReport:
    """A prefill graph judged by what it hands on, from the middle of a stream: the fp32 step reads the
    first W = min(PREFILL_WARMUP, tokens/4) tokens (an odd pointer past 2^5 on the default text), the
    prefill the next L = min(size, (tokens - W)/2) from that state, then the fp32 step continues from its
    state; its logits and the continuation's are judged against the fp32 step streaming the whole text
    (a damaged memory shows in every later token)."""
    ids = text_window(text_ids, tokens)
    n = len(ids) - 1
    warm = min(PREFILL_WARMUP, max(1, n // 4))
    length = min(size, max(1, (n - warm) // 2))
    want = _stream(fp32_step, spec, ids[:-1]) if want is None else want
    _, state = stream_logits(fp32_step, spec, ids[:warm])
    padded = np.zeros((1, size), dtype=np.int64)
    padded[0, :length] = ids[warm : warm + length]
    out = prefill.predict({"tokens": padded, "length": np.array([length], dtype=np.int64), **state})
    state = {s.input: out[s.output] for s in spec.state}  # a prefill graph returns the step's state outputs
    rest = _stream(fp32_step, spec, ids[warm + length : n], state=state).reshape(-1, out["logits"].shape[-1])
    got = np.concatenate([out["logits"], rest])
    report = compare(want[warm + length - 1 :], got, ids[warm + length :], gate, graph, start=warm)
    return report


# ---- weight-only quantization of one graph -------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizers print and log freely (root logger, INFO): silence them while they run."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _nbits_quantizer():
    """onnxruntime's matmul_nbits_quantizer module, imported without the root-logger setup it does
    on import (logging.basicConfig at INFO would make every library's INFO lines print)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    return matmul_nbits_quantizer


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def folded_constants(source: Path):
    """`source` with every subgraph of constants computed into an initializer (onnxruntime's basic,
    standard-ONNX optimizations: constant folding, redundant-node removal), so that a weight that
    reaches its MatMul through Reshape, Transpose, Slice or a mask (the summarizer's) is a plain
    constant the quantizer can take."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as work:
        folded = Path(work) / "folded.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(folded))


def _matmul_form(model) -> None:
    """Rewrite each Gemm with a constant weight (alpha = beta = 1, no transA) as MatMul (+ Add of its
    bias), the weight stored (K, N): onnxruntime's weight-only quantizer takes MatMul only."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        a = _attrs(node)
        if not (node.op_type == "Gemm" and node.input[1] in inits and a.get("alpha", 1.0) == 1.0
                and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)):
            nodes.append(node)
            continue
        weight = node.input[1]
        if a.get("transB", 0):
            weight = node.input[1] + "_kn"
            if weight not in inits:
                inits[weight] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]]).T), weight)
                graph.initializer.append(inits[weight])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = node.output[0] + "_product" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name + "_matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=node.name + "_bias"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    for i, node in enumerate(graph.node):  # the quantizer picks nodes by name: give every node one
        if not node.name:
            node.name = f"lmn_node_{i}"


def _weights(model) -> dict[str, str]:
    """Weight matrices a weight-only precision quantizes: initializer name -> key (op kind and sha256
    of the values, so that one weight has one key in every graph of an export)."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1:
            name, kind = node.input[1], "matmul"
        elif node.op_type == "Gather" and _attrs(node).get("axis", 0) == 0:
            name, kind = node.input[0], "gather"
        else:
            continue
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 or name in found:
            continue
        data = np.ascontiguousarray(numpy_helper.to_array(t))
        found[name] = f"{kind}:{hashlib.sha256(data.tobytes() + str(data.shape).encode()).hexdigest()[:20]}"
    return found


def _dedupe_initializers(model) -> None:
    """The quantizer adds a quantized copy per MatMul: one weight shared by several MatMuls appears
    several times under one name. Keep one (they are identical; anything else is an error)."""
    seen, keep = {}, []
    for t in model.graph.initializer:
        if t.name in seen:
            if seen[t.name] != t.SerializeToString():
                raise ValueError(f"two different initializers named {t.name}")
            continue
        seen[t.name] = t.SerializeToString()
        keep.append(t)
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)


def _matmul_nbits(model, bits: int, block: int, weights: set[str], accuracy_level: int | None):
    """MatMul nodes whose weight is in `weights` -> MatMulNBits (onnxruntime's quantizer, RTN)."""
    nbits = _nbits_quantizer()
    chosen = {n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights}
    if not chosen:
        return model
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=accuracy_level,
                                                op_types_to_quantize=("MatMul",), bits=bits)
    quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config,
                                           nodes_to_exclude=[n.name for n in model.graph.node if n.name not in chosen])
    with _quiet():
        quantizer.process()
    model = quantizer.model.model
    _dedupe_initializers(model)
    return model


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits packed along the last axis, lowest bits first (GatherBlockQuantized's layout)."""
    per = 8 // bits
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, (-values.shape[-1]) % per)])
    grouped = padded.reshape(*padded.shape[:-1], -1, per).astype(np.uint8)
    return np.bitwise_or.reduce([grouped[..., j] << np.uint8(bits * j) for j in range(per)], axis=0).astype(np.uint8)


def _gather_block_quantized(model, bits: int, block: int, weights: set[str]) -> None:
    """Gather(table, ids) on axis 0 with `table` in `weights` -> GatherBlockQuantized: uint8 storage
    (packed for 4 bits), blocks of `block` along each row, round to nearest with a zero point."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if not (node.op_type == "Gather" and node.input[0] in weights and _attrs(node).get("axis", 0) == 0):
            nodes.append(node)
            continue
        table = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        rows, cols = table.shape
        blocks = -(-cols // block)
        grouped = np.pad(table, ((0, 0), (0, blocks * block - cols))).reshape(rows, blocks, block)
        low, high = np.minimum(grouped.min(-1), 0), np.maximum(grouped.max(-1), 0)
        top = 2**bits - 1
        scales = ((high - low) / top).astype(np.float32)
        scales[scales == 0] = 1.0
        zero = np.clip(np.round(-low / scales), 0, top).astype(np.uint8)
        q = np.clip(np.round(grouped / scales[..., None]) + zero[..., None], 0, top).astype(np.uint8)
        q = q.reshape(rows, -1)[:, :cols]
        if bits < 8:
            q, zero = _pack(q, bits), _pack(zero, bits)
        base = node.input[0]
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{base}_Q{bits}"),
                                        numpy_helper.from_array(scales, f"{base}_scales"),
                                        numpy_helper.from_array(zero, f"{base}_zero_points")])
        nodes.append(helper.make_node("GatherBlockQuantized", [f"{base}_Q{bits}", node.input[1], f"{base}_scales",
                                                               f"{base}_zero_points"], list(node.output),
                                      name=f"{node.name}_Q{bits}", domain="com.microsoft", bits=bits,
                                      block_size=block, gather_axis=0, quantize_axis=1))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)


def _drop_unused_initializers(model) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)


def float_weights(model) -> list[tuple[str, str]]:
    """(op type, initializer) of every float matrix (2-D or more) the graph still reads in fp32, whatever
    reads it: a weight reshaped per head before its MatMul (k_proj, v_proj, out_proj in the fast paths)
    is one the quantizer cannot reach, and the manifest must say so."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    found = set()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeLinear", "MatMulInteger"):
            continue  # quantized already: their float inputs are scales
        for name in node.input:
            t = inits.get(name)
            if t is not None and t.data_type == TensorProto.FLOAT and sum(d > 1 for d in t.dims) >= 2:  # a matrix
                found.add((node.op_type, name))
    return sorted(found)


def quantize_weight_only(source: Path, target: Path, precision: str, block: int,
                         plan: dict[str, int | None] | None = None, accuracy_level: int | None = ACCURACY_LEVEL) -> dict:
    """Write `target`: `source` with its weights at BITS[precision], except where `plan` (weight key ->
    bits, None: fp32) says otherwise. Returns the manifest's `quantization` object for it."""

    bits, plan = BITS[precision], plan or {}
    model = folded_constants(source)
    _matmul_form(model)
    chosen = {name: plan.get(key, bits) for name, key in _weights(model).items()}
    for b in sorted({b for b in chosen.values() if b is not None}):
        model = _matmul_nbits(model, b, block, {n for n, c in chosen.items() if c == b}, accuracy_level)
        _gather_block_quantized(model, b, block, {n for n, c in chosen.items() if c == b})
    _drop_unused_initializers(model)
    write_atomic(target, model.SerializeToString())
    left = float_weights(model)
    moved = sorted(n for n, c in chosen.items() if c != bits)
    return {"kind": "weight-only", "bits": bits, "block": block, "method": METHOD, "accuracy_level": accuracy_level,
            "ops": {op: sum(n.op_type == op for n in model.graph.node) for op in ("MatMulNBits", "GatherBlockQuantized")},
            "moved_up": {"to": "int8" if FALLBACK[bits] == 8 else "fp32", "weights": moved},
            "fp32_ops": sorted({op for op, _ in left}), "fp32_weights": [name for _, name in left],
            "activations": ACTIVATIONS.get(accuracy_level, "fp32"),
            "note": "biases, norms and the memory state stay fp32"}


def quantize_dynamic_file(source: Path, target: Path) -> dict:
    """Write `target`: `source` with uint8 weights per output channel and activations quantized per call
    (quantize_dynamic); uint8, not int8, weights so that no CPU's kernel saturates (module docstring)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(target) as tmp, _quiet():
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QUInt8, per_channel=True)
    left = float_weights(onnx.load(str(target)))
    return {"kind": "dynamic", "bits": 8, "method": "quantize_dynamic", "weights": "uint8, per output channel",
            "activations": "uint8, quantized at run time per call (DynamicQuantizeLinear, per tensor)",
            "fp32_ops": sorted({op for op, _ in left}), "fp32_weights": [name for _, name in left]}


def write_quantized_copy(directory: Path, entry: dict, precision: str, block: int = DEFAULT_QUANT_BLOCK,
                         plan: dict[str, int | None] | None = None) -> dict:
    """Quantize the graph of a manifest entry beside it (`x.onnx` -> `x.<precision>.onnx`); the copy's
    entry: the same name, levels, size, inputs and outputs, with its precision and `quantization`."""
    name = quantized_name(entry["file"], precision)
    if precision == "dynamic-int8":
        summary = quantize_dynamic_file(directory / entry["file"], directory / name)
    else:
        summary = quantize_weight_only(directory / entry["file"], directory / name, precision, block, plan)
    return {**entry, "file": name, "precision": precision, "quantization": summary}


# ---- one precision's graph set, exported and judged ----------------------------------------------

class _Judge:
    """Builds a precision's graph set into a folder and judges it; the fp32 references are computed once."""

    def __init__(self, work: Path, fp32: list[dict], text_ids: list[int], tokens: int, precision: str,
                 max_levels: int):

        self.work, self.precision = work, precision
        self.text_ids, self.tokens, self.gate, self.max_levels = text_ids, tokens, GATES[precision], max_levels
        self.step = next(g for g in fp32 if g["name"] == "step")
        self.fast = [g for g in fp32 if g["name"] == "step_levels"]
        self.prefill = [g for g in fp32 if g["name"] == "prefill"]
        self.OnnxPredictor, self.FastPathPredictor = OnnxPredictor, FastPathPredictor
        self.spec = GraphSpec.from_dict(self.step)  # every step graph's I/O, the fast paths' too
        self.fp32_step = OnnxPredictor(work / self.step["file"])
        ids = text_window(text_ids, tokens)[:-1]
        self.want = _stream(self.fp32_step, self.spec, ids)
        self.fp32_fast = None
        if self.fast:
            self.fp32_fast = FastPathPredictor(self.fp32_step, {g["levels"]: OnnxPredictor(work / g["file"])
                                                                for g in self.fast}, max_levels)
            self.want_fast = _stream(self.fp32_fast, self.spec, ids, START_POINTERS[1])

    def judge_step(self, folder: Path, entry: dict) -> ParityReport:
        return stream_report(self.fp32_step, self.OnnxPredictor(folder / entry["file"]), self.spec, self.text_ids, self.tokens,
                             self.gate, f"onnx step {self.precision}", want=self.want)

    def judge_prefill(self, folder: Path, entry: dict) -> ParityReport:
        return prefill_report(self.fp32_step, self.spec, self.OnnxPredictor(folder / entry["file"]), entry["size"], self.text_ids,
                              self.tokens, self.gate, f"onnx prefill {entry['size']} {self.precision}", want=self.want)

    def judge_fast(self, folder: Path, step: dict, fast: list[dict]) -> ParityReport:
        predictor = self.FastPathPredictor(self.OnnxPredictor(folder / step["file"]),
                                           {g["levels"]: self.OnnxPredictor(folder / g["file"]) for g in fast},
                                           self.max_levels)
        report = stream_report(self.fp32_fast, predictor, self.spec, self.text_ids, self.tokens, self.gate,
                               f"onnx fast paths {self.precision}", START_POINTERS[1], want=self.want_fast)
        report.extra["fast_path_steps"] = {str(k): n for k, n in sorted(predictor.used.items())}
        return report

    def build(self, block: int, plan: dict, entries: list[dict] | None = None) -> tuple[list[dict], list[ParityReport]]:
        """Write every graph of the set (or `entries`) into the work folder; their entries and reports."""
        entries = entries if entries is not None else [self.step, *self.fast, *self.prefill]
        copies = [write_quantized_copy(self.work, g, self.precision, block, plan) for g in entries]
        step = next(c for c in copies if c["name"] == "step")
        reports = [self.judge_step(self.work, step)]
        fast = [c for c in copies if c["name"] == "step_levels"]
        if fast:
            reports.append(self.judge_fast(self.work, step, fast))
        reports += [self.judge_prefill(self.work, c) for c in copies if c["name"] == "prefill"]
        return copies, reports

    def sensitivity(self, block: int) -> list[str]:
        """Weight keys, most damaging first: the KL each one alone at this precision causes (all other
        weights fp32), measured on the step graph, or on the smallest prefill for weights only it has."""

        keys_of = {}
        for g in [self.step, *sorted(self.prefill, key=lambda g: g["size"])]:
            model = folded_constants(self.work / g["file"])  # as quantize_weight_only sees the graph
            _matmul_form(model)
            keys_of[g["file"]] = set(_weights(model).values())
        every = set().union(*keys_of.values())
        score = {}
        with tempfile.TemporaryDirectory(prefix="lmn-quant-") as scratch:
            folder = Path(scratch)
            for g in [self.step, *sorted(self.prefill, key=lambda g: g["size"])]:
                for key in sorted(keys_of[g["file"]] - set(score)):
                    plan = {k: None for k in every if k != key}
                    quantize_weight_only(self.work / g["file"], folder / g["file"], self.precision, block, plan)
                    report = (self.judge_step if g["name"] == "step" else self.judge_prefill)(folder, g)
                    score[key] = report.extra["kl_nats"] if report.extra["kl_nats"] is not None else math.inf
        return sorted(score, key=lambda k: (-score[k], k))


def export_precision(work: Path, fp32: list[dict], text_ids: list[int], tokens: int, precision: str, block: int,
                     max_levels: int, progress) -> tuple[list[dict], list[ParityReport]]:
    """Write one precision's copies of the fp32 graphs `fp32` (step, fast paths, prefill) into `work`
    and judge them; returns their manifest entries and reports (a failed report fails the export)."""
    if precision == "dynamic-int8":  # the step and the fast paths, as before; prefill stays fp32
        entries = [g for g in fp32 if g["name"] in ("step", "step_levels")]
        progress(f"quantizing {len(entries)} ONNX step graph(s) to dynamic-int8")
        judge = _Judge(work, entries, text_ids, tokens, precision, max_levels)
        return judge.build(block, {}, entries)
    progress(f"quantizing {len(fp32)} ONNX graph(s) to {precision} (weight-only, block {block})")
    judge = _Judge(work, fp32, text_ids, tokens, precision, max_levels)
    copies, reports = judge.build(block, {})
    if _on_target(reports, judge.gate):
        return copies, reports
    order = judge.sensitivity(block)
    up = FALLBACK[BITS[precision]]
    progress(f"{precision} misses its gate or its headroom ({_summary(reports)}); moving the most sensitive "
             f"of {len(order)} weights to {'int8' if up else 'fp32'} until it passes")
    for count in range(1, len(order) + 1):
        plan = {k: up for k in order[:count]}
        with tempfile.TemporaryDirectory(prefix="lmn-quant-") as scratch:  # the step alone first: it is cheap
            quantize_weight_only(work / judge.step["file"], Path(scratch) / judge.step["file"], precision, block, plan)
            if not _on_target([judge.judge_step(Path(scratch), judge.step)], judge.gate):
                continue
        copies, reports = judge.build(block, plan)
        if _on_target(reports, judge.gate):
            progress(f"{precision} passes with {count} of {len(order)} weights moved up ({_summary(reports)})")
            break
    return copies, reports


def _on_target(reports: list[ParityReport], gate: Gate) -> bool:
    """Every report passes its gate, with HEADROOM to spare."""
    return all(r.passed and r.extra["agreement"] >= gate.min_agreement + HEADROOM.min_agreement
               and r.outputs[1].max_abs_diff <= gate.max_loss_increase * (1 - HEADROOM.max_loss_increase)
               for r in reports)


def _summary(reports: list[ParityReport]) -> str:
    worst = min(reports, key=lambda r: r.extra["agreement"])
    return f"worst agreement {worst.extra['agreement']:.1%} on {worst.graph}"
