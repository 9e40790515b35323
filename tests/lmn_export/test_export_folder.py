"""The export folder: manifest schema, prefill, quantized graph sets, atomic writes, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lmn_export.cli import main
from lmn_export.export import ExportOptions, export
from lmn_export.onnx_export import ExportError
from runtime.manifest import FORMAT_VERSION, ManifestError, file_digest, precision_of, read_manifest, manifest_text

from .conftest import TINY


def test_full_export_passes_every_check(full_export):
    assert full_export.passed, [r.to_dict() for r in full_export.reports if not r.passed]
    graphs = {r.graph for r in full_export.reports if r.graph.startswith("onnx")}
    assert graphs == {"onnx step", "onnx prefill 24",
                      "onnx fast paths @0", "onnx fast paths @16777116", "onnx fast paths @2147482624",
                      f"onnx fast paths @{2**63 - 1 - 48}",  # its last input pointer is pointer_max = 2^63 - 2
                      "onnx step int4", "onnx fast paths int4", "onnx prefill 24 int4",
                      "onnx step int8", "onnx fast paths int8", "onnx prefill 24 int8",
                      "onnx step dynamic-int8", "onnx fast paths dynamic-int8"}
    assert {"coreml step (fp32)", "coreml stateful @0", "coreml stateful @16777116",
            "coreml stateful @2147482624", f"coreml stateful @{2**31 - 1 - 48}"} <= {r.graph for r in full_export.reports}


def test_quantized_graphs_listed(full_export):
    """Each precision copies the step, the fast paths and (weight-only) the prefill, under the same
    name/levels/size with its own precision, file and `quantization` facts."""
    import onnx

    from lmn_export.quantize_graph import float_weights

    manifest = read_manifest(full_export.directory)
    listed = {(g["name"], g.get("levels"), g.get("size"), precision_of(g)): g for g in manifest.graphs("onnx")}
    fp32 = [(name, levels, size) for name, levels, size, p in listed if p == "fp32"]
    assert sorted(fp32, key=str) == sorted([("step", None, None), ("prefill", None, 24),
                                            *(("step_levels", k, None) for k in range(4))], key=str)
    assert manifest.precisions() == ["fp32", "dynamic-int8", "int4", "int8"]
    for precision in ("int4", "int8", "dynamic-int8"):
        copies = [k[:3] for k in listed if k[3] == precision]
        want = [k for k in fp32 if precision != "dynamic-int8" or k[0] != "prefill"]  # dynamic: no prefill copy
        assert sorted(copies, key=str) == sorted(want, key=str), precision
        for key in want:
            graph, original = listed[(*key, precision)], listed[(*key, "fp32")]
            assert graph["file"] == original["file"].removesuffix(".onnx") + f".{precision}.onnx"
            assert graph["inputs"] == original["inputs"] and graph["outputs"] == original["outputs"]
            q = graph["quantization"]
            assert q["kind"] == ("dynamic" if precision == "dynamic-int8" else "weight-only")
            if q["kind"] == "weight-only":
                assert (q["bits"], q["block"], q["method"], q["accuracy_level"]) == (int(precision[3]), 32, "rtn", 4)
                assert q["ops"]["MatMulNBits"] > 0
            # what the manifest says stayed fp32 is what the file holds in fp32
            left = float_weights(onnx.load(str(full_export.directory / graph["file"])))
            assert q["fp32_weights"] == [name for _, name in left] and q["fp32_ops"] == sorted({op for op, _ in left})


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4", "dynamic-int8"])
def test_fast_paths_listed_and_used(full_export, precision):
    """Fast paths for k = 0..3 summary levels in every precision, each taken during its parity stream,
    and a stream of that precision runs only its own step, fast-path and prefill files."""
    import runtime

    manifest = read_manifest(full_export.directory)
    graphs = manifest.graphs("onnx", "step_levels", precision)
    assert [g["levels"] for g in graphs] == [0, 1, 2, 3]
    assert manifest.fast_paths["valid_from_pointer"] == 2 ** (TINY.max_levels - 1) - 1  # the memory is full from there
    report = "onnx fast paths @16777116" if precision == "fp32" else f"onnx fast paths {precision}"
    assert set(next(r for r in full_export.reports if r.graph == report).extra["fast_path_steps"]) == {"0", "1", "2", "3"}
    model = runtime.load(full_export.directory, precision=precision)
    assert set(model.fast_paths) == {0, 1, 2, 3}
    stream = runtime.Stream(model)
    ids = [i % len(model.vocab) for i in range(80)]
    stream.feed_ids(ids[:24])  # at once: the prefill graph
    for i in ids[24:]:  # one a call, past 2^(6-1) = 32: fast paths run
        stream.feed_ids([i])
    steps = {g["file"] for g in [manifest.graph("step", "onnx", precision), *graphs]}
    assert set(stream.stepper.calls) <= steps and {g["file"] for g in graphs} <= set(stream.stepper.calls)
    # the prefill of that precision where the export has one (dynamic-int8 has none: fp32 prefill)
    prefill = manifest.graph("prefill", "onnx", precision) or manifest.graph("prefill", "onnx", "fp32")
    assert set(stream.prefill_calls) == {prefill["file"]}
    assert precision_of(prefill) == ("fp32" if precision in ("fp32", "dynamic-int8") else precision)


def test_a_deep_memory_takes_masked_fast_paths_from_its_first_token(checkpoint, tmp_path):
    """Past 12 levels (a memory that fills only after 2^(L-1) - 1 tokens: a million at 21) the fast paths mask
    the empty slots: the manifest says they apply from pointer 0, a stream takes them from its first tokens, and
    its logits equal PyTorch stepping (1e-4, the export's fp32 bound). Negative control: a fast path that
    assumes a full memory, run there, is wrong."""
    import onnxruntime as ort
    import torch

    import runtime
    from lmn_export.onnx_export import export_step
    from models.checkpoint import load, save

    from .conftest import VOCAB, tiny_model

    model = tiny_model(max_levels=14)
    save(tmp_path / "deep", model, VOCAB)
    result = export(tmp_path / "deep", tmp_path / "out", ExportOptions(prefill_sizes=(), parity_tokens=40))  # no prefill: 16 s, not 44
    assert result.passed
    manifest = read_manifest(tmp_path / "out")
    assert manifest.fast_paths["valid_from_pointer"] == 0 and manifest.fast_paths["levels_cap"] == 13
    assert next(r for r in result.reports if r.graph == "onnx fast paths @0").extra["fast_path_steps"] == \
        {"0": 20, "1": 10, "2": 5, "3": 3}  # 40 tokens from pointer 0: fast paths from the first
    ids = [i % len(VOCAB) for i in range(60)]
    stream, got = runtime.Stream(runtime.load(tmp_path / "out")), []
    for i in ids:
        stream.feed_ids([i])
        got.append(stream.logits.copy())
    assert sum(n for f, n in stream.stepper.calls.items() if f.startswith("step_levels_")) == 60 - 60 // 16
    state, want = model.init_state(1), []
    with torch.no_grad():
        for i in ids:
            logits, state = model.step(torch.tensor([i]), state)
            want.append(logits[0].numpy())
    assert float(np.abs(np.stack(got) - np.stack(want)).max()) < 1e-4
    export_step(model, tmp_path / "full.onnx", levels=0, full=True)  # the unmasked fast path at pointer 0
    empty = model.init_state(1)
    wrong = ort.InferenceSession(str(tmp_path / "full.onnx")).run(None, {
        "token": np.array([ids[0]]), "memory": empty.memory.numpy(), "pointer": np.array([0])})[0]
    assert float(np.abs(wrong[0] - want[0]).max()) > 1e-2


def _reseal(directory, change) -> None:
    """Edit a copied export's manifest and seal it again, as an exporter would."""
    data = json.loads((directory / "lmn.json").read_text())
    change(data)
    (directory / "lmn.json").write_text(manifest_text(data))


def test_runtime_picks_graphs_by_manifest_fields_not_file_names(full_export, tmp_path):
    """Swap the int4 and int8 step files (and say so in the manifest): precision="int4" runs the
    file now named model.int8.onnx, and computes what the int4 graph computes."""
    import shutil

    import numpy as np

    import runtime

    copy = tmp_path / "swapped"
    shutil.copytree(full_export.directory, copy)
    (copy / "model.int4.onnx").rename(copy / "tmp.onnx")
    (copy / "model.int8.onnx").rename(copy / "model.int4.onnx")
    (copy / "tmp.onnx").rename(copy / "model.int8.onnx")

    def swap(data):
        for g in data["graphs"]:
            if g["target"] == "onnx" and g["name"] == "step" and g["precision"] in ("int4", "int8"):
                g["file"] = {"model.int4.onnx": "model.int8.onnx", "model.int8.onnx": "model.int4.onnx"}[g["file"]]
        files = data["files"]
        files["model.int4.onnx"], files["model.int8.onnx"] = files["model.int8.onnx"], files["model.int4.onnx"]

    _reseal(copy, swap)
    ids = [i % TINY.vocab_size for i in range(12)]  # fewer than a prefill: every token is a step
    runs = {}
    for directory, precision in ((full_export.directory, "int4"), (copy, "int4"), (copy, "int8")):
        stream = runtime.Stream(runtime.load(directory, precision=precision))
        logits = []
        for i in ids:
            stream.feed_ids([i])
            logits.append(stream.logits.copy())
        runs[directory.name, precision] = (np.stack(logits), set(stream.graph_calls))
    original, swapped = runs[full_export.directory.name, "int4"], runs["swapped", "int4"]
    assert swapped[1] == {"model.int8.onnx"} and original[1] == {"model.int4.onnx"}
    assert np.array_equal(swapped[0], original[0])  # the same graph, under the other name
    assert not np.array_equal(runs["swapped", "int8"][0], original[0])  # control: int8 is a different graph


def test_missing_precision_is_one_line(full_export, tmp_path):
    """A precision the export lacks: a ManifestError naming the ones it has and how to re-export."""
    import shutil

    import runtime

    copy = tmp_path / "no-int4"
    shutil.copytree(full_export.directory, copy)
    _reseal(copy, lambda d: d.update(graphs=[g for g in d["graphs"] if precision_of(g) != "int4"]))
    runtime.load(copy, precision="int8")  # control: the others still load
    with pytest.raises(ManifestError) as error:
        runtime.load(copy, precision="int4")
    assert str(error.value) == (f"{copy} has no int4 ONNX graphs (it has fp32, dynamic-int8, int8); "
                                "re-export with lmn-export --quantize int4")


def test_two_graphs_for_one_choice_are_refused(full_export, tmp_path):
    """The runtime picks ONNX graphs by (name, precision, levels, size): a manifest listing two is refused."""
    import shutil

    copy = tmp_path / "twice"
    shutil.copytree(full_export.directory, copy)
    _reseal(copy, lambda d: d["graphs"].append(
        dict(next(g for g in d["graphs"] if g["target"] == "onnx" and g["precision"] == "int4"))))
    with pytest.raises(ManifestError, match="two onnx step graphs of precision int4"):
        read_manifest(copy)


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_coreml_backend_loads_the_graph_of_the_precision_asked_for(full_export, monkeypatch, precision):
    """The Core ML backend picks its step graph by the manifest's precision field (loading is stubbed:
    MLModel runs on macOS only); dynamic-int8, an ONNX graph set, is refused."""
    import runtime
    import runtime.model

    loaded = []
    monkeypatch.setattr(runtime.model, "load_coreml_model",
                        lambda path, function: loaded.append((path, function)) or object())
    graphs = read_manifest(full_export.directory).graphs("coreml", "step")
    want = [(g["file"], g.get("function")) for g in graphs if precision_of(g) == precision]
    if not want:
        with pytest.raises(ManifestError, match=f"no {precision} Core ML step graph"):
            runtime.load(full_export.directory, backend="coreml", precision=precision)
        return
    model = runtime.load(full_export.directory, backend="coreml", precision=precision)
    assert loaded == [(str(full_export.directory / want[0][0]), want[0][1])] and model.step_graph["file"] == want[0][0]
    with pytest.raises(ValueError, match="dynamic-int8 is an ONNX graph set"):
        runtime.load(full_export.directory, backend="coreml", precision="dynamic-int8")


def test_coreml_backend_prefills_from_any_state(full_export, monkeypatch):
    """A Core ML-backend stream prefills every long chunk through the export's Core ML prefill graph, from the stream's
    state, and matches the ONNX stream (1e-4: two fp32 runtimes, each within the export's 1e-4 gate of PyTorch).
    MLModel runs on macOS only: here each .mlpackage runs through its saved MIL program (coreml_run)."""
    import runtime
    import runtime.model
    from lmn_export.coreml_run import load_coreml

    monkeypatch.setattr(runtime.model, "load_coreml_model", lambda path, function: load_coreml(path, function)[0])
    coreml, onnx = runtime.load(full_export.directory, backend="coreml"), runtime.load(full_export.directory)
    ids = [i * 7 % TINY.vocab_size for i in range(70)]
    streams = [runtime.Stream(coreml), runtime.Stream(onnx)]
    for stream in streams:
        stream.feed_ids(ids[:5])  # stepped
        stream.feed_ids(ids[5:35])  # mid-stream, at pointer 5: 24 prefilled, 6 stepped
        stream.feed_ids(ids[35:])  # pointer 35: 24 prefilled, then 11 (< 16) stepped
    # one package (iOS 18): the step and the prefill are its functions
    assert streams[0].graph_calls == {"model.mlpackage#prefill_24": 2, "model.mlpackage#step": 5 + 6 + 11}
    np.testing.assert_allclose(streams[0].logits, streams[1].logits, atol=1e-4)
    np.testing.assert_allclose(streams[0].stepper.state["memory"], streams[1].stepper.state["memory"], atol=1e-4)


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
    assert data["model"]["n_embd"] == TINY.n_embd and len(data["vocabulary"]["tokens"]) == TINY.vocab_size
    step = manifest.graph("step", "onnx")
    assert [i["name"] for i in step["inputs"]] == ["token", "memory", "pointer"]
    assert step["inputs"][1]["shape"] == ["batch", TINY.n_layer, TINY.n_slots, TINY.n_embd]
    assert [o["dtype"] for o in step["outputs"]] == ["float32", "float32", "int64"]
    assert [(s["input"], s["output"]) for s in step["state"]] == [("memory", "memory_out"), ("pointer", "pointer_out")]
    coreml = manifest.graph("step", "coreml")
    assert coreml["inputs"][0]["dtype"] == "int32" and coreml["inputs"][2]["dtype"] == "int32"
    assert manifest.graph("step_stateful", "coreml")["precision"] == "fp16"
    assert data["state"]["bytes_per_stream"] == TINY.n_layer * TINY.n_slots * TINY.n_embd * 4 + 8
    assert len(data["source"]["sha256"]) == 64
    weights = {g["weights"] for g in data["graphs"] if g["target"] == "onnx"}
    assert weights == {"weights.fp32.bin", "weights.int4.bin", "weights.int8.bin", "weights.dynamic-int8.bin"}
    assert set(data["files"]) == {g["file"] for g in data["graphs"]} | weights | {"lmn.schema.json", "conformance.json"}
    for name, facts in data["files"].items():
        assert (full_export.directory / name).exists() and facts["bytes"] > 0


def test_prefill_state_equals_steps(full_export):
    report = next(r for r in full_export.reports if r.graph.startswith("onnx prefill"))
    gaps = {o.name: o.max_abs_diff for o in report.outputs}
    assert gaps["memory_out"] <= 1e-4 and gaps["logits"] <= 1e-4 and gaps["pointer_out"] == 0


@pytest.mark.parametrize("precision, agreement, loss", [("int8", 0.98, 0.01), ("int4", 0.90, 0.05),
                                                         ("dynamic-int8", 0.90, 0.05)])
def test_quantized_judged_by_agreement_and_loss(full_export, precision, agreement, loss):
    """Each precision's graphs are judged by its gate (the issue's numbers, written here on purpose)."""
    reports = [r for r in full_export.reports if r.graph.startswith("onnx") and r.graph.endswith(f" {precision}")]
    assert len(reports) == (2 if precision == "dynamic-int8" else 3)  # step, fast paths (, prefill)
    for report in reports:
        assert {o.name: o.atol for o in report.outputs} == pytest.approx(
            {"next_token_disagreement": 1 - agreement, "loss_increase_nats": loss})
        assert report.passed and report.extra["agreement"] >= agreement
        assert report.extra["loss_quantized"] - report.extra["loss_fp32"] <= loss
    step = next(r for r in reports if r.graph.startswith("onnx step"))
    assert step.extra["max_logit_diff"] > 0  # it really is a different (quantized) graph


def test_tampered_file_is_refused(full_export, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full_export.directory, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 1  # same size, one bit changed: the digest catches it
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        read_manifest(copy)
    with open(copy / "model.onnx", "ab") as f:  # a byte more: the size catches it before any hashing
        f.write(b"\0")
    with pytest.raises(ManifestError, match="modified or corrupt"):
        read_manifest(copy)


def test_failed_parity_writes_nothing(checkpoint, tmp_path):
    out = tmp_path / "never"
    result = export(checkpoint, out, ExportOptions(prefill_sizes=(), parity_tokens=4, atol=1e-12))
    assert not result.passed
    assert not out.exists() and not any(tmp_path.iterdir())


def test_force_never_deletes_what_an_export_did_not_write(checkpoint, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    for force in (False, True):
        with pytest.raises(ExportError, match="not an lmn export"):
            export(checkpoint, out, ExportOptions(prefill_sizes=(), parity_tokens=4, force=force))
    assert (out / "cat.jpg").read_bytes() == b"meow"
    export(checkpoint, tmp_path / "exp", ExportOptions(prefill_sizes=(), parity_tokens=4))
    (tmp_path / "exp" / "notes.md").write_text("mine")
    with pytest.raises(ExportError, match=r"does not list \('notes.md'\)"):
        export(checkpoint, tmp_path / "exp", ExportOptions(prefill_sizes=(), parity_tokens=4, force=True))
    assert (tmp_path / "exp" / "notes.md").read_text() == "mine"
    (tmp_path / "exp" / "notes.md").unlink()  # negative control: an export holding only its own files is replaced
    assert export(checkpoint, tmp_path / "exp", ExportOptions(prefill_sizes=(), parity_tokens=4, force=True)).passed


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
    (["--quantize", "dynamic-int8", "--to", "coreml"], "--quantize dynamic-int8 applies to ONNX only"),
    (["--quantize", "bogus"], "unknown --quantize 'bogus'; choose from int4, int8, dynamic-int8"),
    (["--quantize", "int4,int8,int4"], "names a precision twice"),
    (["--quant-block", "3"], "--quant-block must be a power of two >= 16"),
    (["--quant-block", "48"], "--quant-block must be a power of two >= 16"),
    (["--quant-block", "512"], "--quant-block must be a power of two >= 16 and <= 256"),
    (["--quant-block", str(2**63)], "--quant-block must be a power of two >= 16 and <= 256"),
    (["--stateful"], "applies to Core ML"),
])
def test_cli_bad_input_is_one_line(checkpoint, tmp_path, args, message):
    argv = (args if args[0].startswith("/") else [str(checkpoint), *args]) + ["--out", str(tmp_path / "x")]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_corrupt_checkpoint_is_one_line(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    result = CliRunner().invoke(main, [str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "corrupt" in result.output
