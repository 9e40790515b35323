"""lmn-export loses nothing: destinations it refuses, folders it keeps, kills and full disks it
survives, and gates that fail on NaN, on wrong graphs and through the CLI."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmn_export import onnx_export
from lmn_export.cli import main
from lmn_export.export import ExportOptions, export
from lmn_export.predictors import OnnxPredictor
from lmn_export.onnx_export import ExportError
from runtime.atomic import STAGING_MARK, remove_stale_folders as remove_stale
from lmn_export.validate import PREFILL_WARMUP, prefill_parity, prefill_starts, stream_parity, stream_tokens
from models.checkpoint import save
from runtime.atomic import TEMP_MARK

from .conftest import VOCAB, tiny_model

QUICK = ExportOptions(prefill_sizes=(), parity_tokens=4, fast_paths=0)
# A fp32 graph of this tiny model matches PyTorch to ~1e-6 (observed); 1e-4 leaves room for other
# CPUs' reduction order while still catching any real difference (other weights differ by ~0.1).
FP32_BOUND = 1e-4
REPO = Path(__file__).resolve().parents[2]


def staging_folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if TEMP_MARK in p.name)


# --- destinations -------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["", ".", "..", "/", "~", "parent", "cwd"])
def test_protected_destinations_are_refused_even_with_force(checkpoint, tmp_path, monkeypatch, out):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    (cwd / "keep.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    target = {"~": str(Path.home()), "parent": str(tmp_path / "a"), "cwd": str(cwd)}.get(out, out)
    result = CliRunner().invoke(main, [str(checkpoint), "--out", target, "--force", "--prefill", "",
                                       "--parity-tokens", "4"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "never replaces it" in result.output or "names no new folder" in result.output
    assert (cwd / "keep.txt").read_text() == "mine" and staging_folders(cwd.parent) == []


def test_replacing_an_export_needs_force_and_keeps_the_folder_mode(checkpoint, tmp_path):
    out = tmp_path / "exp"
    assert export(checkpoint, out, QUICK).passed
    umask = os.umask(0)
    os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)  # a new folder: the umask, not mkdtemp's 0700
    (out / "model.mlpackage").mkdir()  # an earlier Core ML export the user keeps beside it: never deleted
    for options in (QUICK, ExportOptions(**{**QUICK.__dict__, "force": True})):
        with pytest.raises(ExportError, match="holds files its lmn.json does not list"):
            export(checkpoint, out, options)
    assert (out / "model.mlpackage").is_dir()
    (out / "model.mlpackage").rmdir()  # moved out by the user
    with pytest.raises(ExportError, match="already holds an lmn export; pass --force"):
        export(checkpoint, out, QUICK)
    os.chmod(out, 0o750)
    assert export(checkpoint, out, ExportOptions(**{**QUICK.__dict__, "force": True})).passed
    assert oct(out.stat().st_mode & 0o777) == oct(0o750)
    assert staging_folders(tmp_path) == []


def test_read_only_parent_is_one_line(checkpoint, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the mode cannot be tested as root")
    parent = tmp_path / "ro"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        result = CliRunner().invoke(main, [str(checkpoint), "--out", str(parent / "x"), "--prefill", ""])
    finally:
        os.chmod(parent, 0o755)
    assert result.exit_code != 0 and "cannot write the export" in result.output and "Traceback" not in result.output


@pytest.mark.faults
def test_full_disk_is_one_line_and_leaves_nothing(checkpoint, tmp_path):
    """The file-size limit stands in for a full disk (EFBIG at the same write)."""
    out = tmp_path / "x"
    code = (f"import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\nfrom lmn_export.cli import main\n"
            f"main([{str(checkpoint)!r}, '--out', {str(out)!r}, '--prefill', '', '--parity-tokens', '4'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert ("cannot write the export" in done.stderr or "File too large" in done.stderr), done.stderr[-500:]
    assert not out.exists() and staging_folders(tmp_path) == []


def test_nan_weights_are_refused(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    torch.save  # noqa: B018 - saving goes through models.checkpoint, which refuses NaN too
    from models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="non-finite"):
        save(tmp_path / "nan", model, VOCAB)
    # a checkpoint written some other way (an older lmn, a hand edit) is refused by the exporter
    from safetensors.torch import save_file

    good = tmp_path / "good"
    save(good, tiny_model(), VOCAB)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(good / "model.safetensors"))
    config = (good / "config.json").read_text()
    import json

    meta = json.loads(config)
    meta.pop("sha256", None)
    (good / "config.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(main, [str(good), "--out", str(tmp_path / "x"), "--prefill", ""])
    assert result.exit_code != 0 and "non-finite weights" in result.output


@pytest.mark.parametrize("opset", ["0", "-1", "7", "13", "17", "99"])
def test_unsupported_opsets_are_refused(checkpoint, tmp_path, opset):
    result = CliRunner().invoke(main, [str(checkpoint), "--out", str(tmp_path / "x"), "--opset", opset])
    assert result.exit_code != 0 and "--opset" in result.output and not (tmp_path / "x").exists()


def test_the_opset_asked_for_is_the_opset_written(tmp_path):
    import onnx

    onnx_export.export_step(tiny_model(), tmp_path / "s.onnx", 19)
    assert [o.version for o in onnx.load(tmp_path / "s.onnx").opset_import if o.domain in ("", "ai.onnx")] == [19]


def test_atol_zero_is_zero_and_fails_through_the_cli(checkpoint, tmp_path):
    """--atol 0 means zero (a float32 graph cannot match PyTorch exactly), never "the default":
    the CLI exits 1, says parity failed, and writes nothing."""
    out = tmp_path / "x"
    result = CliRunner().invoke(main, [str(checkpoint), "--out", str(out), "--prefill", "", "--parity-tokens", "8",
                                       "--fast-paths", "0", "--atol", "0"])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "parity FAILED: nothing was written" in result.output
    assert not out.exists() and staging_folders(tmp_path) == []
    bad = CliRunner().invoke(main, [str(checkpoint), "--out", str(out), "--atol", "nan"])
    assert bad.exit_code != 0 and "--atol must be a finite number" in bad.output


# --- kills --------------------------------------------------------------------------------------


def start_export(checkpoint, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmn_export.cli", str(checkpoint), "--out", str(out),
                             "--prefill", "", "--parity-tokens", "400", "--fast-paths", "0"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_staging(parent: Path, process: subprocess.Popen) -> list[Path]:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        found = [p for p in staging_folders(parent) if (p / "model.onnx").is_file()]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the export never reached its staging folder")


@pytest.mark.faults
def test_sigterm_cleans_up_and_sigkill_is_cleaned_by_the_next_export(checkpoint, tmp_path):
    out = tmp_path / "exp"
    process = start_export(checkpoint, out)
    wait_for_staging(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 128 + signal.SIGTERM, process.stderr.read()[-3000:]
    assert staging_folders(tmp_path) == [] and not out.exists()

    process = start_export(checkpoint, out)
    left = wait_for_staging(tmp_path, process)
    process.kill()
    process.wait(60)
    assert staging_folders(tmp_path) == left and not out.exists()  # a SIGKILL cannot clean up...
    assert export(checkpoint, out, QUICK).passed  # ...the next export to that place does
    assert staging_folders(tmp_path) == []


def test_a_kill_mid_replacement_restores_the_old_export(checkpoint, tmp_path):
    """Killed after setting the old export aside but before publishing: the next export puts it back
    first, so it is never lost; a foreign hidden folder with a similar name is left alone."""
    out = tmp_path / "exp"
    assert export(checkpoint, out, QUICK).passed
    aside = tmp_path / f".exp{TEMP_MARK}4000000-abcd-old"  # pid 4,000,000: above Linux's default pid_max
    os.replace(out, aside)
    foreign = tmp_path / f".exp{TEMP_MARK}notours"
    foreign.mkdir()  # no staging mark: not made by lmn-export
    remove_stale(out)
    assert (out / "lmn.json").is_file() and not aside.exists() and foreign.is_dir()
    staged = tmp_path / f".exp{TEMP_MARK}4000000-efgh"
    staged.mkdir()
    (staged / STAGING_MARK).write_bytes(b"")
    assert remove_stale(out) == [staged] and foreign.is_dir()


# --- gates fail on NaN and on wrong graphs ------------------------------------------------------


class Poisoned:
    """A real predictor whose output `name` is replaced by NaN (or inf)."""

    runner = "test"

    def __init__(self, inner, name: str, value: float = math.nan):
        self.inner, self.name, self.value = inner, name, value
        self.session = inner.session

    def predict(self, inputs):
        out = dict(self.inner.predict(inputs))
        out[self.name] = np.full_like(out[self.name], self.value)
        return out


@pytest.mark.parametrize("name, value", [("logits", math.nan), ("memory_out", math.nan), ("logits", math.inf)])
def test_parity_fails_on_nan_and_inf(tmp_path, name, value):
    model = tiny_model()
    spec = onnx_export.export_step(model, tmp_path / "s.onnx")
    good = OnnxPredictor(tmp_path / "s.onnx")
    tokens = stream_tokens(model, VOCAB.encode("To be, or not"), 6)
    assert stream_parity(model, good, spec, tokens, [0, 5, 9], FP32_BOUND, "g", "ort").passed  # control
    report = stream_parity(model, Poisoned(good, name, value), spec, tokens, [0, 5, 9], FP32_BOUND, "g", "ort")
    assert not report.passed
    gap = next(o for o in report.outputs if o.name == name)
    assert gap.max_abs_diff == math.inf and report.to_dict()["outputs"][[o.name for o in report.outputs].index(name)][
        "max_abs_diff"] is None  # standard JSON: null, never NaN


class StartsEmpty:
    """A prefill that ignores the state it is given and starts from the empty stream at pointer 0 (the old graphs)."""

    def __init__(self, inner):
        self.inner = inner

    def predict(self, inputs):
        empty = {**inputs, "memory": np.zeros_like(inputs["memory"]), "pointer": np.zeros_like(inputs["pointer"])}
        got = self.inner.predict(empty)
        return {**got, "pointer_out": got["pointer_out"] + inputs["pointer"]}


def test_a_prefill_graph_of_other_weights_or_from_the_wrong_state_fails(tmp_path):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    starts = prefill_starts(model, 16)
    tokens = stream_tokens(model, VOCAB.encode("To be, or not to be"), PREFILL_WARMUP + 16, len(starts))
    lengths = [(16, 9, 1)[b % 3] for b in range(len(starts))]
    for source, should_pass in ((other, False), (model, True)):  # the model's own graph last: the controls wrap it
        spec = onnx_export.export_prefill(source, tmp_path / "p.onnx", 16)
        report = prefill_parity(model, OnnxPredictor(tmp_path / "p.onnx"), spec, tokens, lengths, starts, FP32_BOUND,
                                "prefill", "ort")
        assert report.passed is should_pass, report.to_dict()
    for wrong in (Poisoned(OnnxPredictor(tmp_path / "p.onnx"), "memory_out"), StartsEmpty(OnnxPredictor(tmp_path / "p.onnx"))):
        assert not prefill_parity(model, wrong, spec, tokens, lengths, starts, FP32_BOUND, "prefill", "ort").passed


def test_a_bad_quantization_fails_the_quantized_gate(tmp_path):
    """The quantized-graph gate (agreement, loss) fails a "quantized" graph that is really other weights, and NaN."""
    from lmn_export.quantize import GATES, stream_report

    model, other = tiny_model(seed=0), tiny_model(seed=1)
    spec = onnx_export.export_step(model, tmp_path / "a.onnx")
    onnx_export.export_step(other, tmp_path / "b.onnx")
    ids = VOCAB.encode("To be, or not to be: that is the question: whether 'tis nobler in the mind")
    gate = GATES["dynamic-int8"]
    fp32 = OnnxPredictor(tmp_path / "a.onnx")
    assert stream_report(fp32, fp32, spec, ids, 60, gate, "g").passed  # control: identical graphs pass
    assert not stream_report(fp32, OnnxPredictor(tmp_path / "b.onnx"), spec, ids, 60, gate, "g").passed
    poisoned = stream_report(fp32, Poisoned(fp32, "logits"), spec, ids, 60, gate, "g")
    assert not poisoned.passed and poisoned.extra["finite"] is False


def test_coreml_of_other_weights_fails_on_linux(tmp_path):
    """The Core ML gate, as it runs here (MIL value inference on Linux), catches wrong weights."""
    from lmn_export import coreml_export
    from lmn_export.coreml_run import load_coreml

    model, other = tiny_model(seed=0), tiny_model(seed=1)
    tokens = stream_tokens(model, VOCAB.encode("To be, or not"), 6)
    spec = coreml_export.export_step(other, tmp_path / "other.mlpackage")
    predictor, runner = load_coreml(tmp_path / "other.mlpackage")
    report = stream_parity(model, predictor, spec, tokens, [0, 5, 9], FP32_BOUND, "coreml", runner)
    assert not report.passed
    assert next(o for o in report.outputs if o.name == "logits").max_abs_diff > 100 * FP32_BOUND
