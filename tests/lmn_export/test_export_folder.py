"""The export folder: manifest schema, prefill, int8, atomic writes, and the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lmn_export.cli import main
from lmn_export.export import ExportOptions, export
from lmn_export.onnx_export import ExportError
from runtime.manifest import FORMAT_VERSION, ManifestError, file_digest, read_manifest

from .conftest import TINY


def test_full_export_passes_every_check(full_export):
    assert full_export.passed, [r.to_dict() for r in full_export.reports if not r.passed]
    graphs = {r.graph for r in full_export.reports}
    assert graphs == {"onnx step", "onnx prefill 24", "onnx step int8", "coreml step (fp32)",
                      "coreml stateful @0", "coreml stateful @16777116", "coreml stateful @2147482624",
                      "onnx fast paths @0", "onnx fast paths @16777116", "onnx fast paths @2147482624",
                      "onnx int8 fast paths"}


def test_fast_paths_listed_and_used(full_export):
    """Fast paths for k = 0..3 summary levels (fp32 and int8), each taken during its parity stream."""
    manifest = read_manifest(full_export.directory)
    for name, precision in (("step_levels", "fp32"), ("step_levels_int8", "int8")):
        graphs = [g for g in manifest.graphs("onnx") if g["name"] == name]
        assert [g["levels"] for g in graphs] == [0, 1, 2, 3] and {g["precision"] for g in graphs} == {precision}
        assert all("memory full" in g["valid_when"] for g in graphs)
    used = next(r for r in full_export.reports if r.graph == "onnx fast paths @16777116").extra["fast_path_steps"]
    assert set(used) == {"0", "1", "2", "3"}
    import runtime

    for precision, suffix in (("fp32", ".onnx"), ("int8", ".int8.onnx")):
        model = runtime.load(full_export.directory, precision=precision)
        assert set(model.fast_paths) == {0, 1, 2, 3}
        stream = runtime.Stream(model)
        stream.feed_ids([i % len(model.vocab) for i in range(80)])  # past 2^(6-1) = 32: fast paths run
        assert all(f.endswith(suffix) for f in stream.stepper.calls), stream.stepper.calls
        assert {f"step_levels_{k}{suffix}" for k in range(4)} <= set(stream.stepper.calls)


def test_coreml_backend_refuses_to_run_off_macos(full_export):
    """The export has a Core ML graph, so only the platform check stands between it and a crash."""
    import sys

    import runtime

    if sys.platform == "darwin":
        pytest.skip("Core ML runs here")
    with pytest.raises(runtime.BackendError, match="runs only on macOS"):
        runtime.load(full_export.directory, backend="coreml")


def test_manifest_schema(full_export):
    manifest = read_manifest(full_export.directory)  # verifies every file's sha256
    data = manifest.data
    assert data["format_version"] == FORMAT_VERSION
    assert data["model"]["n_embd"] == TINY.n_embd and len(data["vocab"]) == TINY.vocab_size
    step = manifest.graph("step", "onnx")
    assert [i["name"] for i in step["inputs"]] == ["token", "memory", "pointer"]
    assert step["inputs"][1]["shape"] == ["batch", TINY.n_layer, TINY.n_slots, TINY.n_embd]
    assert [o["dtype"] for o in step["outputs"]] == ["float32", "float32", "int64"]
    assert [(s["input"], s["output"]) for s in step["state"]] == [("memory", "memory_out"), ("pointer", "pointer_out")]
    coreml = manifest.graph("step", "coreml")
    assert coreml["inputs"][0]["dtype"] == "int32" and coreml["inputs"][2]["dtype"] == "int32"
    assert manifest.graph("step_stateful", "coreml")["precision"] == "fp16"
    assert data["state_bytes_per_stream"] == TINY.n_layer * TINY.n_slots * TINY.n_embd * 4 + 8
    assert len(data["source"]["sha256"]) == 64
    assert set(data["files"]) == {g["file"] for g in data["graphs"]}
    for name, facts in data["files"].items():
        assert (full_export.directory / name).exists() and facts["bytes"] > 0


def test_prefill_state_equals_steps(full_export):
    report = next(r for r in full_export.reports if r.graph.startswith("onnx prefill"))
    gaps = {o.name: o.max_abs_diff for o in report.outputs}
    assert gaps["memory_out"] <= 1e-4 and gaps["logits"] <= 1e-4 and gaps["pointer_out"] == 0


def test_int8_judged_by_agreement_and_loss(full_export):
    report = next(r for r in full_export.reports if r.graph == "onnx step int8")
    assert report.extra["agreement"] >= 0.9
    assert report.extra["loss_int8"] - report.extra["loss_fp32"] <= 0.05
    assert report.extra["max_logit_diff"] > 0  # it really is a different (quantized) graph


def test_tampered_file_is_refused(full_export, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full_export.directory, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        read_manifest(copy)


def test_failed_parity_writes_nothing(checkpoint, tmp_path):
    out = tmp_path / "never"
    result = export(checkpoint, out, ExportOptions(prefill_sizes=(), parity_tokens=4, atol=1e-12))
    assert not result.passed
    assert not out.exists() and not any(tmp_path.iterdir())


def test_refuses_foreign_folder_unless_forced(checkpoint, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ExportError, match="not an lmn export"):
        export(checkpoint, out, ExportOptions(prefill_sizes=(), parity_tokens=4))
    result = export(checkpoint, out, ExportOptions(prefill_sizes=(), parity_tokens=4, force=True))
    assert result.passed and not (out / "cat.jpg").exists()


def test_cli_exports_and_reports(checkpoint, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [str(checkpoint), "--out", str(out), "--prefill", "", "--parity-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output and "state per stream" in result.output and "ok" in result.output
    assert (out / "lmn.json").is_file()
    first = json.loads((out / "lmn.json").read_text())["files"]
    refused = CliRunner().invoke(main, [str(checkpoint), "--out", str(out), "--prefill", "", "--parity-tokens", "16"])
    assert refused.exit_code != 0 and "already holds an lmn export; pass --force" in refused.output
    again = CliRunner().invoke(main, [str(checkpoint), "--out", str(out), "--prefill", "", "--parity-tokens", "16",
                                      "--json", "--force"])
    assert again.exit_code == 0, again.output
    data = json.loads(again.output)
    assert data["passed"] and data["files"]["model.onnx"]["sha256"] == file_digest(out / "model.onnx")
    assert data["files"] == first  # the same checkpoint exports to byte-identical ONNX files


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/ckpt"], "not a checkpoint"),
    (["--quantize", "int8", "--to", "coreml"], "applies to ONNX"),
    (["--stateful"], "applies to Core ML"),
])
def test_cli_bad_input_is_one_line(checkpoint, tmp_path, args, message):
    argv = (args if args[0].startswith("/") else [str(checkpoint), *args]) + ["--out", str(tmp_path / "x")]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_corrupt_checkpoint_is_one_line(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    result = CliRunner().invoke(main, [str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "corrupt" in result.output
