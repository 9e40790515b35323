"""One ONNX graph's weights rewritten at a lower precision (lmn_export.quantize says which, and judges them).

- int4, int8, weight-only (`quantize_weight_only`): every constant weight matrix of a MatMul becomes
  onnxruntime's MatMulNBits (a Gemm is first rewritten as MatMul + Add) and the embedding table of a
  Gather becomes GatherBlockQuantized, except the weights a plan keeps at other bits.
- dynamic-int8 (`quantize_dynamic_file`): onnxruntime's quantize_dynamic with uint8 weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from runtime.atomic import atomic_path, write_atomic

DEFAULT_QUANT_BLOCK = 32
BITS = {"int4": 4, "int8": 8}
FALLBACK = {4: 8, 8: None}  # where a weight goes when its precision fails the gate (None: stays fp32)
METHOD = "rtn"
ACCURACY_LEVEL = 4
WEIGHT_OPS = ("MatMul", "Gemm", "Gather")  # the ops whose constant 2-D float input is a weight matrix


# What MatMulNBits does with its activations, by accuracy_level: a client with another int8 kernel
# (or none) computes something else, so lmn.json says it (quantization.activations).
ACTIVATIONS = {4: "int8, quantized at run time per block of the input row (MatMulNBits accuracy_level 4)",
               0: "fp32 (MatMulNBits accuracy_level 0: dequantized weights, fp32 compute)",
               1: "fp32 (MatMulNBits accuracy_level 1)"}

def quantized_name(file: str, precision: str) -> str:
    """`model.onnx` -> `model.int4.onnx` (the manifest, not this name, says what a file is)."""
    return f"{file.removesuffix('.onnx')}.{precision}.onnx"


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


def matmul_form(model) -> None:
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


def weight_keys(model) -> dict[str, str]:
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
    matmul_form(model)
    chosen = {name: plan.get(key, bits) for name, key in weight_keys(model).items()}
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
