"""One Core ML package: the step and the prefill graphs are functions of one multifunction .mlpackage
(iOS 18), each weight stored once, each function exactly the program that passed parity; the iOS 16
form (a package per graph) is kept for older targets; a package without a listed function is refused."""

from __future__ import annotations

import json
import platform

import pytest

import runtime
from lmn_export import coreml_export
from lmn_export.coreml_package import combine_functions, program_digest
from lmn_export.coreml_run import load_coreml
from lmn_export.export import ExportOptions, export
from lmn_export.onnx_export import ExportError
from runtime.manifest import ManifestError, file_size

from .conftest import tiny_model


def test_the_export_writes_one_package_with_a_function_per_graph(full_export):
    manifest = json.loads((full_export.directory / "lmn.json").read_text(encoding="utf-8"))
    graphs = [g for g in manifest["graphs"] if g["target"] == "coreml" and g["name"] in ("step", "prefill")
              and g["precision"] == "fp32"]  # the quantized steps (int4, int8) stay packages of their own
    assert {(g["file"], g["function"]) for g in graphs} == {("model.mlpackage", "step"), ("model.mlpackage", "prefill_24")}
    assert all(g["minimum_deployment_target"] == "iOS18/macOS15" for g in graphs)
    assert not (full_export.directory / "prefill_24.mlpackage").exists()  # the single-function sources are gone
    predictor, _ = load_coreml(full_export.directory / "model.mlpackage", "prefill_24")
    assert set(predictor.function.inputs) == {"tokens", "length", "memory", "pointer"}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """A tiny model's step and prefill converted for iOS 18, each its own package."""
    folder = tmp_path_factory.mktemp("coreml")
    model = tiny_model(n_embd=32)
    coreml_export.export_step(model, folder / "model.mlpackage", "fp32", "iOS18")
    coreml_export.export_prefill(model, folder / "prefill_16.mlpackage", 16, "fp32", "iOS18")
    return folder


def entries():
    return [{"name": "step", "file": "model.mlpackage"}, {"name": "prefill", "size": 16, "file": "prefill_16.mlpackage"}]


def test_combined_functions_store_shared_weights_once(packages, tmp_path):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(packages, work)
    separate = file_size(work / "model.mlpackage") + file_size(work / "prefill_16.mlpackage")
    listed = entries()
    combine_functions(work, listed, lambda m: None)
    assert [(e["file"], e["function"]) for e in listed] == [("model.mlpackage", "step"), ("model.mlpackage", "prefill_16")]
    assert sorted(p.name for p in work.iterdir()) == ["model.mlpackage"]
    # the embedding, attention, feed-forward and head weights are shared; the summarizer's differ in form
    combined = file_size(work / "model.mlpackage")
    assert combined < 0.8 * separate, (combined, separate)
    for name, source in (("step", packages / "model.mlpackage"), ("prefill_16", packages / "prefill_16.mlpackage")):
        assert program_digest(load_coreml(work / "model.mlpackage", name)[0].function) == \
            program_digest(load_coreml(source)[0].function)


def test_a_combined_function_that_is_not_its_source_is_refused(packages, tmp_path, monkeypatch):
    """Negative control of the check: a package whose `step` function holds the prefill's program fails the
    export, and the sources are left in place."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(packages, work)
    ct = coreml_export._coremltools()

    class Swapped(ct.utils.MultiFunctionDescriptor):
        def add_function(self, path, src_function_name, target_function_name):
            other = "prefill_16.mlpackage" if target_function_name == "step" else "model.mlpackage"
            super().add_function(str(work / other), src_function_name, target_function_name)

    monkeypatch.setattr(ct.utils, "MultiFunctionDescriptor", Swapped)
    with pytest.raises(ExportError, match="function 'step' is not the program that passed parity"):
        combine_functions(work, entries(), lambda m: None)
    assert (work / "prefill_16.mlpackage").is_dir()


def test_ios16_keeps_a_package_per_graph(checkpoint, tmp_path):
    result = export(checkpoint, tmp_path / "out", ExportOptions(targets=("coreml",), coreml_target="iOS16",
                                                                prefill_sizes=(16,), parity_tokens=24))
    assert result.passed
    graphs = {g["name"]: g for g in result.manifest["graphs"]}
    assert graphs["step"]["file"] == "model.mlpackage" and graphs["prefill"]["file"] == "prefill_16.mlpackage"
    assert all("function" not in g and g["minimum_deployment_target"] == "iOS16/macOS13" for g in graphs.values())


def test_a_package_without_the_listed_function_is_refused(full_export, monkeypatch):
    """On macOS the runtime opens `file` with `function_name`; a package that lacks the function (a file of
    another export) is refused first, with the re-export message (here: platform patched, spec read)."""
    from runtime import backends

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    with pytest.raises(ManifestError, match="has no Core ML function 'prefill_4096' .*re-export"):
        backends.load_coreml_model(str(full_export.directory / "model.mlpackage"), "prefill_4096")


def test_unknown_coreml_target_is_refused(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--coreml-target must be one of iOS18, iOS16"):
        export(checkpoint, tmp_path / "out", ExportOptions(targets=("coreml",), coreml_target="iOS15"))
    assert runtime  # the runtime reads what the export writes (imported for the manifest types above)
