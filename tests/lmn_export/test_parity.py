"""Exported step graphs compute what the PyTorch step computes, for every model variant."""

from __future__ import annotations

import pytest

from lmn_export import coreml_export, onnx_export
from lmn_export.coreml_run import MIL, load_coreml
from lmn_export.export import OnnxPredictor
from lmn_export.validate import (FP32_ATOL, START_POINTERS, AtolError, NameMismatchError, check_names,
                                 start_pointers, stream_parity, stream_tokens)
from models import GPT, GPTConfig

from .conftest import VOCAB, tiny_model

# Every summarizer, both expander settings and both bank counts, in six exports per target.
VARIANTS = {
    "linear-1bank": dict(summarizer="linear", n_bank=1),
    "linear-2bank-expand2": dict(summarizer="linear", n_bank=2, expand=2),
    "conv-2bank": dict(summarizer="conv", n_bank=2),
    "conv-1bank-expand1": dict(summarizer="conv", n_bank=1, expand=1),
    "dwsep-2bank": dict(summarizer="dwsep", n_bank=2),
    "dwsep-1bank-expand2": dict(summarizer="dwsep", n_bank=1, expand=2),
}
TOKENS = 40  # past 2^5 = 32, so every level of max_levels 6 re-summarizes at least once per row


def tokens_for(model, steps=TOKENS):
    return stream_tokens(model, VOCAB.encode("To be, or not to be: that is the question:\n"), steps)


@pytest.mark.parametrize("name", VARIANTS)
def test_onnx_step_parity(name, tmp_path):
    model = tiny_model(**VARIANTS[name])
    spec = onnx_export.export_step(model, tmp_path / "step.onnx")
    predictor = OnnxPredictor(tmp_path / "step.onnx")
    check_names(spec, predictor.input_names, predictor.output_names)
    start = start_pointers(model, TOKENS)
    assert start == list(START_POINTERS)  # 0, just below 2^24 (crossed mid-stream), 2^31 - 2^10
    report = stream_parity(model, predictor, spec, tokens_for(model), start, FP32_ATOL, "onnx", "ort")
    report.raise_for_failure()
    assert report.batch == 3


@pytest.mark.parametrize("name", VARIANTS)
def test_coreml_step_parity(name, tmp_path):
    model = tiny_model(**VARIANTS[name])
    spec = coreml_export.export_step(model, tmp_path / "step.mlpackage")
    predictor, runner = load_coreml(tmp_path / "step.mlpackage")
    start = start_pointers(model, 24, 2**31 - 1)
    report = stream_parity(model, predictor, spec, tokens_for(model, 24), start, FP32_ATOL, "coreml", runner)
    report.raise_for_failure()
    if runner == MIL:
        assert len(predictor.ops) > 50  # the saved program itself was evaluated, op by op


def test_negative_control_other_weights_fail(tmp_path):
    """A graph exported from other weights must fail validation against this model."""
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    spec = onnx_export.export_step(other, tmp_path / "other.onnx")
    predictor = OnnxPredictor(tmp_path / "other.onnx")
    report = stream_parity(model, predictor, spec, tokens_for(model, 8), [0, 5, 9], FP32_ATOL, "onnx", "ort")
    assert not report.passed
    with pytest.raises(AtolError, match="logits"):
        report.raise_for_failure()


def test_names_are_checked_first(tmp_path):
    model = tiny_model()
    spec = onnx_export.export_step(model, tmp_path / "step.onnx")
    with pytest.raises(NameMismatchError):
        check_names(spec, ["token", "mem", "pointer"], ["logits", "memory_out", "pointer_out"])


def test_gpt_kv_cache_step_exports_with_parity(tmp_path):
    model = GPT(GPTConfig(vocab_size=len(VOCAB), n_embd=16, n_head=2, n_layer=2, block_size=64)).eval()
    spec = onnx_export.export_step(model, tmp_path / "gpt.onnx")
    assert [t.name for t in spec.inputs] == ["token", "keys", "values", "pointer"]
    predictor = OnnxPredictor(tmp_path / "gpt.onnx")
    start = start_pointers(model, 30)
    report = stream_parity(model, predictor, spec, tokens_for(model, 30), start, FP32_ATOL, "gpt", "ort")
    report.raise_for_failure()
    assert start == [0, 17, 34]


def test_onnx_bytes_are_reproducible(tmp_path):
    model = tiny_model(summarizer="dwsep", expand=1)
    onnx_export.export_step(model, tmp_path / "a.onnx")
    onnx_export.export_step(model, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_coreml_fp16_within_documented_bound(tmp_path):
    """--precision fp16: the looser, documented bound (FP16_ATOL) holds; fp32's does not have to."""
    from lmn_export.validate import FP16_ATOL

    model = tiny_model()
    spec = coreml_export.export_step(model, tmp_path / "half.mlpackage", precision="fp16")
    predictor, runner = load_coreml(tmp_path / "half.mlpackage")
    report = stream_parity(model, predictor, spec, tokens_for(model, 24), start_pointers(model, 24, 2**31 - 1),
                           FP16_ATOL, "coreml fp16", runner)
    report.raise_for_failure()
    assert max(o.max_abs_diff for o in report.outputs) > 1e-6  # it really computed in half precision


@pytest.mark.parametrize("name", ["linear-2bank-expand2", "conv-1bank-expand1", "dwsep-2bank"])
def test_fast_paths_stream_with_parity(name, tmp_path):
    """Fast-path graphs (exactly k levels, full memory), picked per token as the runtime picks them,
    stream what the PyTorch step streams; every k is exercised from each start pointer."""
    from lmn_export.export import FastPathPredictor

    model = tiny_model(**VARIANTS[name])
    levels = model.config.max_levels
    spec = onnx_export.export_step(model, tmp_path / "step.onnx")
    fast = {}
    for k in range(levels):
        onnx_export.export_step(model, tmp_path / f"fast{k}.onnx", levels=k, full=True)
        fast[k] = OnnxPredictor(tmp_path / f"fast{k}.onnx")
    tokens = tokens_for(model, 2**levels + 8)  # from pointer 0: fills the memory, then every k
    for row, pointer in enumerate(start_pointers(model, tokens.shape[1])):
        predictor = FastPathPredictor(OnnxPredictor(tmp_path / "step.onnx"), fast, levels)
        report = stream_parity(model, predictor, spec, tokens[row : row + 1], [pointer], FP32_ATOL, "fast", "ort")
        report.raise_for_failure()
        assert set(predictor.used) == set(range(levels)), (pointer, predictor.used)


def test_fast_path_at_the_wrong_pointer_fails_parity(tmp_path):
    """Negative control: the 0-level fast path run where a level re-summarizes leaves a stale
    summary, which the parity check catches (so the dispatch rule is what makes fast paths right)."""
    from lmn_export.export import FastPathPredictor

    model = tiny_model()
    spec = onnx_export.export_step(model, tmp_path / "step.onnx")
    onnx_export.export_step(model, tmp_path / "fast0.onnx", levels=0, full=True)
    wrong = OnnxPredictor(tmp_path / "fast0.onnx")
    predictor = FastPathPredictor(OnnxPredictor(tmp_path / "step.onnx"), {k: wrong for k in range(6)}, 6)
    report = stream_parity(model, predictor, spec, tokens_for(model, 8)[:1], [2**24 - 100], FP32_ATOL, "fast", "ort")
    with pytest.raises(AtolError, match="memory_out"):
        report.raise_for_failure()
