"""Weight-only int8 / int4 copies of the Core ML step (`--to coreml --quantize int8,int4`).

Weights are stored compressed in the package and decompressed by Core ML (`constexpr_*` ops);
activations, state and compute stay in the step's precision. Compressed: every constant of
rank >= 2 read by a linear, matmul, conv or gather (the embedding); vectors (biases, norm scales)
stay as they are and are listed in the manifest entry (`quantization.fp32_weights`, and the ops
reading them in `fp32_ops`), as is any weight int4 cannot tile with --quant-block.

  int8  linear symmetric, one scale per output channel: constexpr_affine_dequantize, iOS 16 / macOS 13
  int4  linear symmetric, one scale per block of --quant-block input elements (of one output
        channel): constexpr_blockwise_shift_scale, iOS 18 / macOS 15

For 4 bits, block-wise linear int4 was measured against 4-bit palettization (one 16-entry
look-up table per weight, constexpr_lut_to_dense, which iOS 16 runs), next-token agreement with the
fp32 step over 512 tokens of the parity text: on the shipped checkpoint palettization kept 57%
(+0.54 nats/char, uniform table; a k-means table, simulated in PyTorch: 74%, +0.26) against 80%
(+0.14) for int4 in blocks of 32; on the tiny test model 87% against 89% (blocks of 16). So int4
is block-wise and needs iOS 18. (No 4-bit format meets the int4 gate on the shipped 32-wide model.)

Each copy is judged like the ONNX precisions (quantize.compare and quantize.GATES), against the
Core ML step it was compressed from, streaming the parity text from an empty memory: next-token
agreement and cross-entropy increase. A copy that fails its gate fails the export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .coreml_export import DEPLOYMENT, _coremltools, convert_step
from .coreml_run import load_coreml, load_program
from .graphs import GraphSpec
from .onnx_export import ExportError
from .streaming import stream_logits
from .quantize import GATES, QUANTIZE_CHOICES, compare, text_window
from .validate import ParityReport

# Ops whose constant operand of rank >= 2 is a weight matrix (or kernel, or embedding table).
WEIGHT_OPS = ("linear", "matmul", "conv", "conv_transpose", "gather")


@dataclass(frozen=True)
class Format:
    bits: int
    granularity: str  # "per-channel" | "per-block"
    op: str  # the decompression op the package holds
    target: str  # the converter's minimum deployment target


# The gates (next-token agreement, loss increase) are the ONNX precisions' own: quantize.GATES.
FORMATS = {
    "int4": Format(4, "per-block", "constexpr_blockwise_shift_scale", "iOS18"),
    "int8": Format(8, "per-channel", "constexpr_affine_dequantize", "iOS16"),
}
UNCOMPRESSED_NOTE = ("biases and norm scales (vectors), activations and the memory state stay in the compute "
                     "precision (fp32 unless --precision fp16)")


def _op_config(kind: str, block: int):
    import coremltools.optimize.coreml as cto

    if kind == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                           weight_threshold=0)
    return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                       block_size=block, weight_threshold=0)


def weight_names(program) -> list[str]:
    """Names of the constants a compressed copy compresses: float, rank >= 2, read only by WEIGHT_OPS."""
    names = []
    for op in program.functions["main"].operations:
        if op.op_type != "const":
            continue
        value, readers = op.outputs[0].val, op.outputs[0].child_ops
        if (isinstance(value, np.ndarray) and value.ndim >= 2 and value.dtype.kind == "f" and readers
                and all(r.op_type in WEIGHT_OPS for r in readers)):
            names.append(op.name)
    return names


def stored_floats(program) -> dict[str, list[str]]:
    """The float tensors of 10 or more elements that Core ML stores as they are (in the weight file):
    name -> the op types reading it; the scales and tables of decompression ops are not listed."""
    found = {}
    for op in program.functions["main"].operations:
        value, readers = op.outputs[0].val if op.op_type == "const" else None, op.outputs[0].child_ops
        if (isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size >= 10
                and not all(r.op_type.startswith("constexpr_") for r in readers)):
            found[op.name] = sorted({r.op_type for r in readers})
    return found


def compress(mlmodel, kind: str, block: int):
    """(compressed mlmodel, names of the weights compressed, {name: reader op types} of the stored float
    tensors left as they were, {decompression op type: count}). Raises ExportError when no weight
    could be compressed."""
    _coremltools()
    import coremltools.optimize.coreml as cto

    before = load_program(mlmodel)
    names = weight_names(before)
    config = cto.OptimizationConfig(op_name_configs={name: _op_config(kind, block) for name in names})
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        try:
            compressed = cto.linear_quantize_weights(mlmodel, config)
        except Exception as e:
            raise ExportError(f"Core ML {kind} compression failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0]}") from e
    after = load_program(compressed)
    left = stored_floats(after)
    done = [name for name in names if name not in left]
    ops = Counter(op.op_type for op in after.functions["main"].operations if op.op_type.startswith("constexpr_"))
    if not done:
        raise ExportError(f"--quantize {kind}: no weight of this model can be compressed"
                          + (f" in blocks of {block} (no weight's input size is a multiple of it); "
                             "choose a smaller --quant-block" if kind == "int4" else ""))
    return compressed, done, left, dict(ops)


def judge(want: np.ndarray, got: np.ndarray, targets: list[int], kind: str, runner: str) -> ParityReport:
    """Quantized logits `got` against the reference `want` on text, by the precision's gate (the
    ONNX precisions' `compare`: agreement, loss increase; NaN or inf fails both)."""
    report = compare(want, got, targets, GATES[kind], f"coreml step {kind}")
    report.runner = runner
    return report


def _uncompressed(model, source: Path, source_target: str, fmt: Format, precision: str):
    """The step to compress: the saved package `source` (converted for `source_target`) itself when the format
    needs that target, else the step converted anew for the format's target (its decompression op's)."""
    if fmt.target == source_target:
        return _coremltools().models.MLModel(str(source), skip_model_load=True)
    return convert_step(model, precision, fmt.target)[0]


def export_quantized(model, work: Path, options, source: Path, spec: GraphSpec, text_ids: list[int],
                     progress=lambda message: None) -> tuple[list[dict], list[ParityReport]]:
    """Write `model.<kind>.mlpackage` into `work` for each Core ML kind in `options.quantize`: the step
    saved at `source` (`options.coreml_target`, `options.precision`) with compressed weights, each judged against that
    step on the parity text. Returns their manifest entries and reports (a failed report fails the export)."""
    kinds = [k for k in QUANTIZE_CHOICES if k in FORMATS and k in options.quantize]
    if not kinds:
        return [], []
    ids = text_window(text_ids, options.parity_tokens)
    reference, _ = load_coreml(source)
    want = stream_logits(reference, spec, ids[:-1])
    entries, reports = [], []
    for kind in kinds:
        fmt, name = FORMATS[kind], f"model.{kind}.mlpackage"
        block = options.quant_block if fmt.granularity == "per-block" else None
        progress(f"compressing Core ML step weights to {kind} ({fmt.granularity}"
                 + (f", blocks of {block}" if block else "") + f", {DEPLOYMENT[fmt.target]})")
        compressed, done, left, ops = compress(_uncompressed(model, source, options.coreml_target, fmt, options.precision), kind, block or 0)
        compressed.short_description = (f"{type(model).__name__} single-token step ({kind} weights, "
                                        f"{options.precision} compute)")
        compressed.save(str(work / name))
        predictor, runner = load_coreml(work / name)
        progress(f"checking Core ML {kind} next-token agreement over {len(ids) - 1} tokens with {runner}")
        reports.append(judge(want, stream_logits(predictor, spec, ids[:-1]), ids[1:], kind, runner))
        quantization = {"kind": "weight-only", "bits": fmt.bits, "activations": f"{options.precision}, not quantized",
                        "granularity": fmt.granularity,
                        **({"block": block} if block else {}), "method": "linear_symmetric", "format": fmt.op,
                        "ops": ops, "weights": done,
                        "fp32_ops": sorted({t for types in left.values() for t in types}), "fp32_weights": sorted(left),
                        "note": UNCOMPRESSED_NOTE}
        entries.append({"name": "step", "target": "coreml", "file": name, "precision": kind,
                        "compute_precision": options.precision, "minimum_deployment_target": DEPLOYMENT[fmt.target],
                        "quantization": quantization, **spec.to_dict()})
    return entries, reports
