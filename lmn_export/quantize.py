"""int8 dynamic quantization of the ONNX step graph, judged by next-token agreement and loss."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path

import numpy as np

from .validate import OutputDiff, ParityReport


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


def _stream(predictor, ids: list[int], start: int = 0):
    """Logits (T, V) of one row fed `ids` from zero memory at pointer `start` (state outputs are `<input>_out`)."""
    state = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtype=ORT_DTYPES[i.type])
             for i in predictor.session.get_inputs() if i.name != "token"}
    state["pointer"] = np.array([start], dtype=np.int64)
    out = []
    for token in ids:
        got = predictor.predict({"token": np.array([token], dtype=np.int64), **state})
        out.append(got["logits"][0])
        state = {name: got[f"{name}_out"] for name in state}
    return np.stack(out)


def _cross_entropy(logits: np.ndarray, targets: list[int]) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].mean())


def quantize_file(source: Path, target: Path) -> None:
    """Write `target`: `source` with int8 weights and dynamically quantized activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def int8_report(fp32, int8, text_ids: list[int], options, graph: str = "onnx step int8", start: int = 0) -> ParityReport:
    """Compare int8 and fp32 predictors streaming the text from pointer `start`: agreement and loss."""
    ids = text_ids[: options.parity_tokens + 1]
    want, got = _stream(fp32, ids[:-1], start), _stream(int8, ids[:-1], start)
    finite = bool(np.isfinite(want).all() and np.isfinite(got).all())
    agreement = float((want.argmax(-1) == got.argmax(-1)).mean()) if finite else 0.0
    loss_fp32, loss_int8 = _cross_entropy(want, ids[1:]), _cross_entropy(got, ids[1:])
    increase = max(0.0, loss_int8 - loss_fp32) if finite else math.inf  # NaN logits fail, never pass
    report = ParityReport(graph, "onnxruntime", len(ids) - 1, 1, [start], [
        OutputDiff("next_token_disagreement", 1 - agreement, 1 - options.int8_min_agreement),
        OutputDiff("loss_increase_nats", increase, options.int8_max_loss_increase),
    ])
    report.extra = {"agreement": agreement, "finite": finite,
                    **{k: v if math.isfinite(v) else None for k, v in (
                        ("loss_fp32", loss_fp32), ("loss_int8", loss_int8),
                        ("max_logit_diff", float(np.abs(want - got).max())))}}
    return report


def quantize_int8(source: Path, target: Path, text_ids: list[int], options) -> ParityReport:
    """Write `target` (int8 weights, dynamic activations) and compare it with `source` on text."""
    from .export import OnnxPredictor

    quantize_file(source, target)
    return int8_report(OnnxPredictor(source), OnnxPredictor(target), text_ids, options)
