"""Weight-only quantization (MatMulNBits, GatherBlockQuantized) and the gates that judge it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmn_export.export import ExportOptions, check_options, export
from lmn_export.onnx_export import ExportError
from lmn_export.quantize_graph import folded_constants, matmul_form, quantize_weight_only, weight_keys

V, E, H, N = 65, 64, 48, 40


def _graph(path, rng) -> dict[str, np.ndarray]:
    """ids -> Gather(table) -> Gemm(transB, bias) -> two MatMuls sharing one weight: the shapes the
    exporter writes (embedding, nn.Linear on a 2-D input, a summarizer weight used by several levels)."""
    w = {"table": rng.standard_normal((V, E)), "linear": rng.standard_normal((H, E)) / 8, "bias": rng.standard_normal(H),
         "shared": rng.standard_normal((H, N)) / 7}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"], axis=0, name="embed"),
             helper.make_node("Gemm", ["x", "linear", "bias"], ["h"], transB=1, name="linear"),
             helper.make_node("MatMul", ["h", "shared"], ["y1"], name="level1"),
             helper.make_node("Add", ["h", "h"], ["h2"], name="double"),
             helper.make_node("MatMul", ["h2", "shared"], ["y2"], name="level2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["b", N]) for y in ("y1", "y2")],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def _run(path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(session.run(None, {"ids": np.arange(V, dtype=np.int64)}), axis=1)


def _relative(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# Round to nearest with a zero point per block of 32 spreads each block's range over 2^bits - 1
# steps; three quantized stages in series (table, linear, shared; accuracy_level 4 also rounds the
# MatMul inputs to int8). Measured here: 11.6% relative error for int4, 0.93% for int8; the bounds
# leave about 2x. Wrong weights (packed, transposed or scaled wrongly) give errors near 1.4, the
# distance between unrelated outputs.
BOUNDS = {"int4": 0.25, "int8": 0.02}


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_weight_only_computes_the_dequantized_graph(tmp_path, precision):
    rng = np.random.default_rng(0)
    w = _graph(tmp_path / "g.onnx", rng)
    h = w["table"] @ w["linear"].T + w["bias"]
    want = np.concatenate([h @ w["shared"], (h + h) @ w["shared"]], axis=1)
    assert _relative(_run(tmp_path / "g.onnx"), want) < 1e-5  # control: the fp32 graph is the reference

    summary = quantize_weight_only(tmp_path / "g.onnx", tmp_path / "q.onnx", precision, 32)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("GatherBlockQuantized") == 1 and "Gemm" not in ops
    assert summary["fp32_weights"] == [] and summary["moved_up"]["weights"] == []
    assert sum(t.name == f"shared_Q{precision[3]}" for t in quantized.graph.initializer) == 1  # shared once
    gap = _relative(_run(tmp_path / "q.onnx"), want)
    assert 0 < gap < BOUNDS[precision], gap
    other = np.concatenate([h @ rng.standard_normal((H, N)), (h + h) @ rng.standard_normal((H, N))], axis=1)
    assert _relative(other, want) > 5 * BOUNDS[precision]  # the bound tells right weights from wrong ones


def test_a_plan_keeps_weights_fp32_or_moves_them_up(tmp_path):
    """plan: weight key -> bits (None: fp32). All fp32 reproduces the graph; the summary lists what moved."""
    from lmn_export.quantize_graph import matmul_form, weight_keys

    _graph(tmp_path / "g.onnx", np.random.default_rng(0))
    model = onnx.load(str(tmp_path / "g.onnx"))
    matmul_form(model)
    keys = weight_keys(model)  # initializer -> key; the Gemm weight is stored (K, N) as linear_kn
    assert set(keys) == {"table", "linear_kn", "shared"}
    summary = quantize_weight_only(tmp_path / "g.onnx", tmp_path / "f.onnx", "int4", 32, {k: None for k in keys.values()})
    assert sorted(summary["fp32_weights"]) == ["linear_kn", "shared", "table"] and summary["ops"]["MatMulNBits"] == 0
    assert _relative(_run(tmp_path / "f.onnx"), _run(tmp_path / "g.onnx")) < 1e-6
    summary = quantize_weight_only(tmp_path / "g.onnx", tmp_path / "m.onnx", "int4", 32, {keys["shared"]: 8})
    assert summary["moved_up"] == {"to": "int8", "weights": ["shared"]} and summary["ops"]["MatMulNBits"] == 3


@pytest.mark.parametrize("change, message", [
    (dict(quantize="int8"), "a tuple in Python"),
    (dict(quantize=("int8", "fp16")), "unknown --quantize 'fp16'; choose from int4, int8, dynamic-int8"),
    (dict(quantize=("int4", "int4")), "names a precision twice"),
    (dict(quantize=("dynamic-int8",), targets=("coreml",)), "applies to ONNX only"),
    (dict(quant_block=8), "power of two >= 16"), (dict(quant_block=24), "power of two >= 16"),
    (dict(quant_block=True), "power of two >= 16"), (dict(quant_block=32.0), "power of two >= 16"),
])
def test_quantize_options_are_checked(change, message):
    with pytest.raises(ExportError, match=message):
        check_options(ExportOptions(**change))
    check_options(ExportOptions(quantize=("int4", "int8", "dynamic-int8"), quant_block=16))  # control


def test_scrambled_int4_scales_fail_the_gate_and_write_nothing(checkpoint, tmp_path, monkeypatch):
    """Negative control: int4 graphs whose block scales are shuffled compute other weights; the gate
    fails them (no repair can help, every trial is scrambled) and the export publishes nothing."""
    from lmn_export import quantize_graph

    real, calls = quantize_graph.quantize_weight_only, []

    def scrambled(source, target, *args, **kwargs):
        summary = real(source, target, *args, **kwargs)
        model = onnx.load(str(target))
        for t in model.graph.initializer:
            if t.name.endswith("_scales"):
                values = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(values.ravel()).reshape(values.shape), t.name))
        onnx.save(model, str(target))
        calls.append(target)
        return summary

    monkeypatch.setattr(quantize_graph, "quantize_weight_only", scrambled)
    out = tmp_path / "never"
    result = export(checkpoint, out, ExportOptions(quantize=("int4",), prefill_sizes=(), fast_paths=0, parity_tokens=32))
    assert calls and not result.passed
    report = next(r for r in result.reports if r.graph == "onnx step int4")
    assert not report.passed and report.extra["agreement"] < 0.9, report.extra
    assert all(r.passed for r in result.reports if r is not report)  # only the scrambled graph failed
    assert not out.exists() and not any(tmp_path.iterdir())


def _step_logits(model, ids: list[int], start: int = 0) -> np.ndarray:
    """PyTorch's step over `ids` from an empty memory at pointer `start` -> logits (T, V)."""
    import torch

    state, out = model.init_state(1), []
    state.pointer.fill_(start)
    with torch.no_grad():
        for token in ids:
            logits, state = model.step(torch.tensor([token]), state)
            out.append(logits[0].numpy())
    return np.stack(out)


def test_unfolded_step_attention_is_quantized_whole(tmp_path, monkeypatch):
    """A model too wide to fold its attention (logmem-128 and up) reads k_proj, v_proj and out_proj
    each as the constant 2-D operand of one product, so weight-only quantization takes every weight
    matrix of the 0-level fast path and every attention weight of the general step (whose summarizer
    weight, masked into a block-diagonal matrix in the graph, is folded into a constant first); both
    fp32 graphs match PyTorch within 1e-4 (float rounding, ~1e-6 here). Negative control: with every
    weight kept fp32 by the plan, every matrix is listed."""
    import models.lmn
    from lmn_export import onnx_export
    from lmn_export.predictors import FastPathPredictor, OnnxPredictor
    from lmn_export.streaming import stream_logits
    from lmn_export.validate import START_POINTERS

    from .conftest import tiny_model

    monkeypatch.setattr(models.lmn, "FOLD_MAX_WEIGHTS", 0)  # the unfolded read at a tiny size
    model = tiny_model(n_embd=64, n_head=4)
    L = model.config.n_layer
    ids = [int(i) for i in np.random.default_rng(0).integers(model.config.vocab_size, size=20)]
    want, far = _step_logits(model, ids), _step_logits(model, ids, START_POINTERS[1])  # far: where fast paths run
    other = _step_logits(tiny_model(seed=1, n_embd=64, n_head=4), ids)
    assert np.abs(other - want).max() > 100 * 1e-4  # control: the bound tells other weights apart
    spec = onnx_export.export_step(model, tmp_path / "step.onnx")
    onnx_export.export_step(model, tmp_path / "fast0.onnx", levels=0, full=True)
    general = OnnxPredictor(tmp_path / "step.onnx")
    assert np.abs(stream_logits(general, spec, ids) - want).max() < 1e-4
    fast = FastPathPredictor(general, {0: OnnxPredictor(tmp_path / "fast0.onnx")}, model.config.max_levels)
    assert np.abs(stream_logits(fast, spec, ids, START_POINTERS[1]) - far).max() < 1e-4 and fast.used.get(0)  # the 0-level graph ran

    summary = quantize_weight_only(tmp_path / "fast0.onnx", tmp_path / "fast0.int4.onnx", "int4", 32)
    assert summary["fp32_weights"] == [], summary["fp32_weights"]
    assert summary["ops"]["MatMulNBits"] == 6 * L + 1  # q, k, v, out, ff up, ff down per layer; the head
    summary = quantize_weight_only(tmp_path / "step.onnx", tmp_path / "step.int4.onnx", "int4", 32)
    assert summary["fp32_weights"] == [], summary["fp32_weights"]  # the summarizer too, once its mask is folded

    # negative control: the listing reports what stays fp32 (every matrix, when the plan keeps them all)
    model_folded = folded_constants(tmp_path / "fast0.onnx")
    matmul_form(model_folded)
    keep_all = {key: None for key in weight_keys(model_folded).values()}
    summary = quantize_weight_only(tmp_path / "fast0.onnx", tmp_path / "kept.onnx", "int4", 32, keep_all)
    assert len(summary["fp32_weights"]) == 6 * L + 2 and summary["ops"]["MatMulNBits"] == 0  # and the embedding
