"""Core ML weight compression (`--to coreml --quantize int8,int4`): the decompression kernels the
Linux evaluator runs, the compressed packages, their gates, and the export around them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmn_export import coreml_export, coreml_quantize
from lmn_export.cli import main
from lmn_export.coreml_run import (MILProgram, affine_dequantize, blockwise_shift_scale, load_coreml, load_program,
                                   lut_to_dense)
from lmn_export.export import ExportOptions, export
from lmn_export.onnx_export import ExportError
from lmn_export.parity_text import parity_ids
from lmn_export.streaming import stream_logits
from models.checkpoint import save
from runtime.manifest import file_size, read_manifest

from .conftest import VOCAB, tiny_model

TOKENS = 32  # parity tokens per gate: enough for the margins noted below, cheap on the MIL evaluator
BLOCK = 16  # the tiny model is 16 wide: blocks of 32 would not tile its 16-input weights
DECOMPRESSION_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense")
WEIGHT_READERS = ("linear", "matmul", "conv", "conv_transpose", "gather")


# ---- the decompression kernels, against element-by-element numpy references ----------------------

def test_affine_dequantize_matches_its_definition():
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, size=(3, 5)).astype(np.int8)
    scale, zero = rng.uniform(0.01, 1, 5).astype(np.float32), rng.integers(-3, 4, 5).astype(np.int8)
    got = affine_dequantize(q, zero, scale, axis=1)
    want = np.array([[scale[j] * (float(q[i, j]) - float(zero[j])) for j in range(5)] for i in range(3)], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # one fp32 product each: equal to rounding
    assert got.dtype == np.float32
    scalar = affine_dequantize(q, np.int8(2), np.float16(0.5), axis=0)  # scalar parameters; fp16 out
    assert scalar.dtype == np.float16 and np.array_equal(scalar, ((q.astype(np.float32) - 2) * 0.5).astype(np.float16))
    assert not np.allclose(affine_dequantize(q, zero, scale[::-1].copy(), axis=1), want)  # control: order matters


def test_blockwise_shift_scale_matches_its_definition():
    rng = np.random.default_rng(1)
    data = rng.integers(-8, 8, size=(4, 8)).astype(np.int8)  # int4 values, as the loaded program holds them
    scale, offset = rng.uniform(0.1, 1, (2, 2)).astype(np.float32), rng.integers(-2, 3, (2, 2)).astype(np.int8)
    got = blockwise_shift_scale(data, scale, offset)  # blocks of 2 rows x 4 columns
    want = np.array([[scale[i // 2, j // 4] * (float(data[i, j]) - float(offset[i // 2, j // 4])) for j in range(8)]
                     for i in range(4)], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(blockwise_shift_scale(data, scale[:, :1]), data * scale[:, :1].repeat(2, 0), rtol=1e-6)
    with pytest.raises(ExportError, match="do not tile"):
        blockwise_shift_scale(data, np.ones((3, 1), np.float32))


def _pack_bits(indices: list[int], nbits: int) -> np.ndarray:
    """The MIL spec's packing, bit by bit: element i's bit b at stream position i*nbits + b, LSB first."""
    packed = np.zeros(-(-len(indices) * nbits // 8), np.uint8)
    for i, index in enumerate(indices):
        for b in range(nbits):
            position = i * nbits + b
            packed[position // 8] |= ((index >> b) & 1) << (position % 8)
    return packed


@pytest.mark.parametrize("nbits", [1, 4, 6])  # 6: indices cross byte boundaries
def test_lut_to_dense_matches_its_definition(nbits):
    rng = np.random.default_rng(nbits)
    lut = rng.normal(size=2**nbits).astype(np.float32)
    indices = [int(i) for i in rng.integers(0, 2**nbits, 15)]
    got = lut_to_dense(_pack_bits(indices, nbits), lut, (3, 5))
    assert np.array_equal(got, lut[indices].reshape(3, 5))


# ---- compressed packages of the tiny model ---------------------------------------------------------

def _weights_of(path, function: str | None = None) -> dict[str, np.ndarray]:
    """The weight matrices of a saved fp32 step, found independently of the exporter: float constants
    of rank >= 2 read only by weight-reading ops."""
    found = {}
    for op in MILProgram(path, function).function.operations:
        value = op.outputs[0].val if op.op_type == "const" else None
        readers = op.outputs[0].child_ops
        if (isinstance(value, np.ndarray) and value.ndim >= 2 and value.dtype.kind == "f" and readers
                and all(r.op_type in WEIGHT_READERS for r in readers)):
            found[op.name] = value
    return found


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """The tiny model's step as fp32 (iOS 16), int8 (from that package) and int4 (iOS 18), compressed
    by the exporter's own `compress`, plus the parity text."""
    import coremltools as ct

    folder = tmp_path_factory.mktemp("coreml-quant")
    model = tiny_model()
    coreml_export.export_step(model, folder / "fp32.mlpackage")
    saved = ct.models.MLModel(str(folder / "fp32.mlpackage"), skip_model_load=True)
    int8 = coreml_quantize.compress(saved, "int8", 0)[0]
    int8.save(str(folder / "int8.mlpackage"))
    int4 = coreml_quantize.compress(coreml_export.convert_step(model, "fp32", "iOS18")[0], "int4", BLOCK)[0]
    int4.save(str(folder / "int4.mlpackage"))
    ids = parity_ids(model, VOCAB, TOKENS)[0][: TOKENS + 1]
    return folder, model, ids


def _per_element(values: np.ndarray, shape: tuple, axis: int | None = None) -> np.ndarray:
    """Per-channel (a vector along `axis`) or per-block (same rank) parameters spread over `shape`."""
    values = np.asarray(values, np.float32)
    if axis is not None:
        return np.broadcast_to(values.reshape([-1 if i == axis else 1 for i in range(len(shape))]), shape)
    for i, n in enumerate(shape):
        values = np.repeat(values, n // values.shape[i], axis=i)
    return values


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_decompressed_weights_are_the_weights_within_half_a_step(kind, packages):
    """What the Linux evaluator decompresses from the saved package is (q - zero) * scale with each
    element's own scale, and lies within half a quantization step (scale / 2) of the fp32 weight it
    replaced. Control: the same integers with the scales in reverse order miss the bound."""
    folder, _, _ = packages
    original = _weights_of(folder / "fp32.mlpackage")
    program = MILProgram(folder / f"{kind}.mlpackage")
    ops = [op for op in program.function.operations if op.op_type in DECOMPRESSION_OPS]
    assert len(ops) == len(original) and program.decompressed == {coreml_quantize.FORMATS[kind].op: len(ops)}
    for op in ops:
        want = original[op.name.removesuffix("_quantized")]
        if kind == "int8":
            q, axis = op.quantized_data.val.astype(np.float32), int(op.axis.val)
            assert not op.zero_point.val.any()  # symmetric
            step = _per_element(op.scale.val, q.shape, axis)
            reversed_step = _per_element(op.scale.val[::-1], q.shape, axis)
        else:
            q = op.data.val.astype(np.float32)
            assert op.offset is None and q.min() >= -8 and q.max() <= 7  # symmetric int4
            step = _per_element(op.scale.val, q.shape)
            reversed_step = _per_element(op.scale.val[::-1], q.shape)
        np.testing.assert_allclose(op.outputs[0].val, q * step, rtol=1e-6, atol=0)  # the kernel: one product
        slack = step / 2 * (1 + 1e-5) + 1e-7  # round to nearest, plus fp32 rounding of the product
        assert (np.abs(q * step - want) <= slack).all(), op.name
        assert np.abs(q * step - want).max() > 0, op.name  # really quantized
        if not np.array_equal(reversed_step, step):  # scales that differ by row: the control has teeth
            assert not (np.abs(q * reversed_step - want) <= slack).all(), op.name


def _scrambled(source, target):
    """`source` with the scales of every decompression op permuted (the same values, wrong rows)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    program = load_program(ct.models.MLModel(str(source), skip_model_load=True))
    main_function, rng = program.functions["main"], np.random.default_rng(0)
    with main_function:
        for op in [op for op in main_function.operations if op.op_type in DECOMPRESSION_OPS]:
            values = op.scale.val
            new = mb.const(val=rng.permutation(values.ravel()).reshape(values.shape), before_op=op,
                           name=f"{op.scale.name}_scrambled")
            op.enclosing_block.replace_uses_of_var_after_op(anchor_op=new.op, old_var=op.scale, new_var=new,
                                                            no_check_var_types=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flexible-batch notice: the evaluator takes any batch
        ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                   pass_pipeline=ct.PassPipeline.EMPTY).save(str(target))


def test_scrambled_scales_fail_the_agreement_gate(packages, tmp_path):
    """Negative control: the int8 package passes its gate (control); the same package with its scales
    permuted fails it, on agreement (measured 56% on these 32 tokens; the gate is 98%)."""
    folder, model, ids = packages
    spec = coreml_export.coreml_spec(model.config)
    want = stream_logits(load_coreml(folder / "fp32.mlpackage")[0], spec, ids[:-1])
    honest = coreml_quantize.judge(want, stream_logits(load_coreml(folder / "int8.mlpackage")[0], spec,
                                                                        ids[:-1]), ids[1:], "int8", "mil")
    assert honest.passed, honest.to_dict()
    _scrambled(folder / "int8.mlpackage", tmp_path / "scrambled.mlpackage")
    got = stream_logits(load_coreml(tmp_path / "scrambled.mlpackage")[0], spec, ids[:-1])
    report = coreml_quantize.judge(want, got, ids[1:], "int8", "mil")
    assert not report.passed and report.extra["agreement"] < 0.9, report.to_dict()
    failed = {o.name for o in report.outputs if not o.passed}
    assert "next_token_disagreement" in failed


def test_nan_logits_fail_both_checks():
    want = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    assert coreml_quantize.judge(want, want, [1, 2, 3, 4], "int4", "mil").passed  # control
    report = coreml_quantize.judge(want, np.full_like(want, np.nan), [1, 2, 3, 4], "int4", "mil")
    assert not any(o.passed for o in report.outputs), report.to_dict()


def test_blocks_that_tile_no_weight_are_one_line_errors(packages):
    """int4 blocks of 128 tile none of the tiny model's weights (inputs of 16, 32 and 64): refused,
    with what to do, instead of writing an 'int4' package that is all fp32."""
    _, model, _ = packages
    with pytest.raises(ExportError, match="no weight of this model can be compressed in blocks of 128") as e:
        coreml_quantize.compress(coreml_export.convert_step(model, "fp32", "iOS18")[0], "int4", 128)
    assert "\n" not in str(e.value) and "--quant-block" in str(e.value)


# ---- through the export ---------------------------------------------------------------------------

def two_level_model():
    """The tiny model with every weight matrix holding one magnitude and random signs, as a
    quantization-aware-trained checkpoint holds values on the 4-bit grid. A tiny model with random
    weights has near-tied logits, so 4-bit rounding flips ~12% of its next tokens (the int4 gate
    refuses it, test_failed_gate_writes_nothing); this one keeps 98-99% through int4."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.sign(p) * p.abs().mean())
    return model


@pytest.fixture(scope="module")
def quantized_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml-quant-export")
    save(root / "ckpt", two_level_model(), VOCAB, {"preset": "test"})
    options = ExportOptions(targets=("coreml",), quantize=("int8", "int4"), quant_block=BLOCK, parity_tokens=TOKENS)
    return export(root / "ckpt", root / "out", options)


def test_int8_and_int4_exports_pass_their_gates(quantized_export):
    result = quantized_export
    assert result.passed, [r.to_dict() for r in result.reports if not r.passed]
    gates = {r.graph: r for r in result.reports if r.graph.startswith("coreml step int")}
    assert set(gates) == {"coreml step int8", "coreml step int4"}
    # the gates of the issue: int8 >= 98% and <= +0.01 nats, int4 >= 90% and <= +0.05
    assert {name: tuple(round(o.atol, 9) for o in r.outputs) for name, r in gates.items()} == {
        "coreml step int8": (0.02, 0.01), "coreml step int4": (0.1, 0.05)}
    for report in gates.values():
        assert report.tokens == TOKENS and report.extra["max_logit_diff"] > 0  # judged, and really compressed


def test_manifest_entries_and_files(quantized_export):
    manifest = read_manifest(quantized_export.directory)  # every file's sha256 verified
    steps = {g["precision"]: g for g in manifest.graphs("coreml") if g["name"] == "step"}
    assert list(steps) == ["fp32", "int4", "int8"]  # fp32 first: what the runtime's Core ML backend loads
    assert manifest.graph("step", "coreml")["file"] == "model.mlpackage"
    for kind, target, granularity in (("int8", "iOS16/macOS13", "per-channel"), ("int4", "iOS18/macOS15", "per-block")):
        entry = steps[kind]
        assert entry["file"] == f"model.{kind}.mlpackage" and entry["minimum_deployment_target"] == target
        assert entry["inputs"] == steps["fp32"]["inputs"] and entry["state"] == steps["fp32"]["state"]
        q = entry["quantization"]
        assert (q["kind"], q["bits"], q["granularity"], q["format"]) == ("weight-only", int(kind[3:]), granularity,
                                                                         coreml_quantize.FORMATS[kind].op)
        assert q.get("block") == (BLOCK if kind == "int4" else None)
        assert q["fp32_weights"] and "linear" in q["fp32_ops"]  # biases stay fp32 and are listed
    sizes = {kind: file_size(quantized_export.directory / g["file"]) for kind, g in steps.items()}
    assert sizes["int4"] < sizes["int8"] < 0.7 * sizes["fp32"], sizes


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_every_weight_is_compressed_and_counted(kind, quantized_export):
    """The saved package holds one decompression op per weight matrix of the fp32 step (counted here
    from the fp32 package), as many as the manifest says; what stays uncompressed is listed and holds
    no weight matrix."""
    folder = quantized_export.directory
    entry = next(g for g in read_manifest(folder).graphs("coreml") if g["precision"] == kind)
    weights = _weights_of(folder / "model.mlpackage", "step")  # the fp32 package's step function
    program = MILProgram(folder / entry["file"])
    ops = [op for op in program.function.operations if op.op_type.startswith("constexpr_")]
    assert ops and {op.op_type for op in ops} == {entry["quantization"]["format"]}
    assert entry["quantization"]["ops"] == {entry["quantization"]["format"]: len(ops)}
    assert len(ops) == len(weights)
    assert sorted(entry["quantization"]["weights"]) == sorted(weights)
    assert not set(entry["quantization"]["fp32_weights"]) & set(weights)
    assert not _weights_of(folder / entry["file"])  # no weight matrix left as it was


def test_failed_gate_writes_nothing(checkpoint, tmp_path):
    """The random tiny model: int8 passes its gate, int4 misses it (measured 78% agreement on 32
    tokens, 89% on 512), so the export fails and leaves nothing behind."""
    out = tmp_path / "never"
    result = export(checkpoint, out, ExportOptions(targets=("coreml",), quantize=("int8", "int4"), quant_block=BLOCK,
                                                   parity_tokens=TOKENS))
    reports = {r.graph: r for r in result.reports}
    assert reports["coreml step int8"].passed and reports["coreml step (fp32)"].passed
    assert not reports["coreml step int4"].passed and reports["coreml step int4"].extra["agreement"] < 0.9
    assert not result.passed and not out.exists() and not any(tmp_path.iterdir())


def test_dynamic_int8_for_core_ml_is_a_one_line_error(checkpoint, tmp_path):
    result = CliRunner().invoke(main, [str(checkpoint), "--to", "coreml", "--quantize", "dynamic-int8",
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "dynamic-int8 applies to ONNX only" in result.output and len(result.output.strip().splitlines()) == 1
