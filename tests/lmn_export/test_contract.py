"""Manifest format 2 is the contract: checked by a real JSON Schema validator, read by the runtime
(roles, fast-path rule, pointer bounds), guarded where the graphs cannot, and shipped with
conformance vectors that `lmn-verify` runs."""

from __future__ import annotations

import copy
import json
import shutil

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import runtime
from runtime.manifest import ManifestError, check_fields, check_schema, manifest_text
from runtime.schema_check import SCHEMA_PATH, SchemaViolation, check, load_schema
from runtime.verify import main as verify_main

from .conftest import TINY


def rewrite(folder, change) -> None:
    """Change an export's lmn.json and re-seal it (what a careless hand edit with a fixed digest does)."""
    data = json.loads((folder / "lmn.json").read_text(encoding="utf-8"))
    change(data)
    (folder / "lmn.json").write_text(manifest_text(data), encoding="utf-8")


@pytest.fixture
def copied(full_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(full_export.directory, folder)
    return folder


def manifest_of(full_export) -> dict:
    return json.loads((full_export.directory / "lmn.json").read_text(encoding="utf-8"))


def test_manifest_valid_under_a_real_json_schema_validator(full_export):
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(manifest_of(full_export))
    assert (full_export.directory / "lmn.schema.json").read_bytes() == SCHEMA_PATH.read_bytes()
    assert manifest_of(full_export)["$schema"] == "lmn.schema.json"


BREAKS = [
    ("format 1", lambda d: d.update(format_version=1)),
    ("no role", lambda d: d["graphs"][0]["inputs"][0].pop("role")),
    ("unknown role", lambda d: d["graphs"][0]["inputs"][0].update(role="query")),
    ("pointer max as a number", lambda d: d["pointer"].update(max=2**63 - 2)),
    ("negative pointer string", lambda d: d["pointer"].update(max="-1")),
    ("fast-path rule as prose", lambda d: d["fast_paths"].update(valid_from_pointer="when the memory is full")),
    ("unknown vocabulary unit", lambda d: d["vocabulary"].update(unit="word")),
    ("unknown field", lambda d: d.update(valid_when="memory full")),
    ("bad sha", lambda d: d["files"][next(iter(d["files"]))].update(sha256="xyz")),
    ("prefill from the empty state only (format 2)", lambda d: d["prefill"].update(starts_from="initial state")),
    ("bool for an integer", lambda d: d["graphs"][0].update(opset=True)),
]


@pytest.mark.parametrize("what, change", BREAKS, ids=[b[0] for b in BREAKS])
def test_builtin_checker_agrees_with_jsonschema(full_export, what, change):
    """The runtime's dependency-free checker refuses exactly what jsonschema refuses (and passes the
    real manifest, above): each break is refused by both."""
    schema = load_schema()
    data = manifest_of(full_export)
    check(data, schema)  # control: the unbroken manifest passes
    change(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(data)
    with pytest.raises(SchemaViolation):
        check(data, schema)


def test_format_1_refused_with_re_export_message(copied):
    rewrite(copied, lambda d: d.update(format_version=1))
    with pytest.raises(ManifestError, match="re-export the model with this lmn's lmn-export"):
        runtime.load(copied)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["graphs"][0]["inputs"][0].update(role="state", state="memory"), "exactly one input with role 'token'"),
    (lambda d: d["graphs"][0]["state"][0].update(output="logits"), "do not both carry"),
    (lambda d: d["vocabulary"]["token_ids"].update(max=999), "disagrees with the model"),
    (lambda d: d.pop("fast_paths"), "without the 'fast_paths' rule"),
])
def test_cross_field_rules(full_export, tmp_path, change, message):
    data = manifest_of(full_export)
    check_schema(tmp_path / "lmn.json", data)
    change(data)
    with pytest.raises(ManifestError, match=message):
        check_schema(tmp_path / "lmn.json", data)
        check_fields(tmp_path / "lmn.json", data)


def test_runtime_binds_tensors_by_role_not_position(full_export, copied):
    """Reordered inputs and outputs in lmn.json (roles kept) give the same stream: the runtime reads roles."""
    def reorder(d):
        for g in d["graphs"]:
            g["inputs"].reverse()
            g["outputs"].reverse()
    rewrite(copied, reorder)
    ids = [i % TINY.vocab_size for i in range(50)]
    a, b = runtime.Stream(runtime.load(full_export.directory)), runtime.Stream(runtime.load(copied))
    a.feed_ids(ids)
    b.feed_ids(ids)
    assert np.array_equal(a.logits, b.logits)


def test_fast_path_rule_is_read_from_the_manifest(copied):
    """valid_from_pointer moved out of reach: the runtime takes no fast path (it reads the rule, not max_levels)."""
    ids = [i % TINY.vocab_size for i in range(80)]
    fast = runtime.Stream(runtime.load(copied))
    fast.feed_ids(ids)
    assert any(f.startswith("step_levels") for f in fast.graph_calls)  # control: fast paths run past 2^5
    rewrite(copied, lambda d: d["fast_paths"].update(valid_from_pointer=10**6))
    slow = runtime.Stream(runtime.load(copied))
    slow.feed_ids(ids)
    assert not any(f.startswith("step_levels") for f in slow.graph_calls)
    assert np.abs(slow.logits - fast.logits).max() <= 1e-4  # fp32 parity bound: both graphs are exact


def test_start_token_is_read_from_the_manifest(copied):
    vocab = json.loads((copied / "lmn.json").read_text())["vocabulary"]["tokens"]
    rewrite(copied, lambda d: d["vocabulary"]["start"].update(text=vocab[5], ids=[5]))
    stream = runtime.Stream(runtime.load(copied))
    list(stream.generate(1, temperature=0))
    reference = runtime.Stream(runtime.load(copied))
    reference.feed_ids([5])
    assert stream.tokens_seen == 2 and stream.stepper.calls.total() == 2
    assert reference.stepper.pointer == 1


def test_pointer_guards(full_export):
    model = runtime.load(full_export.directory)
    top = model.pointer_max
    assert top == 2**63 - 2  # int64 pointer + 1 must fit
    with pytest.raises(ValueError, match="pointer must be a whole number"):
        runtime.Stream(model, pointer=top + 1)
    stream = runtime.Stream(model, pointer=top - 2)
    stream.feed_ids([1, 2, 3])  # input pointers top-2, top-1, top: all supported
    before = {k: v.copy() for k, v in stream.stepper.state.items()}
    with pytest.raises(runtime.ContextFullError, match="supports pointers up to"):
        stream.feed_ids([1])
    assert all(np.array_equal(before[k], v) for k, v in stream.stepper.state.items())  # nothing was fed
    assert np.isfinite(stream.logits).all()


def test_high_start_equals_low_start_with_the_same_alignment(full_export):
    """A stream started at pointer p behaves as one at p mod 2^(max_levels-1) + 2^(max_levels-1) (same schedule)."""
    model = runtime.Stream(runtime.load(full_export.directory), pointer=2**63 - 2 - 40)
    period = 2 ** (TINY.max_levels - 1)
    low = runtime.Stream(runtime.load(full_export.directory), pointer=(2**63 - 2 - 40) % period + 2 * period)
    ids = [i % TINY.vocab_size for i in range(40)]
    model.feed_ids(ids)
    low.feed_ids(ids)
    assert np.abs(model.logits - low.logits).max() <= 1e-6  # same graphs, same inputs but the pointer: exact


def test_prefill_guard(full_export):
    model = runtime.load(full_export.directory)
    state = runtime.Stream(model).stepper.state
    with pytest.raises(ValueError, match="prefill takes 1 or more"):
        model.prefill([], state)
    with pytest.raises(ValueError, match="out of range"):
        model.prefill([TINY.vocab_size] * 20, state)
    pointer = model.pointer_input
    bad_states = [
        {k: v for k, v in state.items() if k != pointer},  # an array missing
        {**state, "memory": state["memory"][..., :-1]},  # a shape
        {**state, "memory": np.repeat(state["memory"], 2, axis=0)},  # a batch
        {**state, "memory": state["memory"].astype(np.float64)},  # a dtype
        {**state, pointer: np.array([-1], dtype=np.int64)},  # a negative pointer
        {**state, pointer: np.array([model.pointer_max - 18], dtype=np.int64)},  # 20 tokens pass pointer_max
    ]
    for bad in bad_states:
        before = {k: np.array(v) for k, v in bad.items()}
        with pytest.raises(ValueError, match="starting") as error:
            model.prefill([1] * 20, bad)
        assert "\n" not in str(error.value)
        assert all(np.array_equal(before[k], bad[k]) for k in bad)  # nothing changed
    used, logits, after, _ = model.prefill([1] * 20, {**state, pointer: np.array([model.pointer_max - 19], dtype=np.int64)})
    assert used == 20 and int(after[pointer][0]) == model.pointer_max + 1  # exactly fits: the last token at pointer_max


def test_parity_from_zero_reaches_the_fast_paths(full_export):
    report = next(r for r in full_export.reports if r.graph == "onnx fast paths @0")
    assert report.tokens >= 2 ** (TINY.max_levels - 1) + 64
    assert sum(report.extra["fast_path_steps"].values()) > 0  # the hand-over from a filling memory was checked
    validated = manifest_of(full_export)["pointer"]["validated"]
    assert {"from": str(2**63 - 1 - 48), "to": str(2**63 - 2), "graphs": "onnx step"} in validated


def test_lmn_verify_says_when_a_folder_cannot_be_checked(copied):
    """A conformance.json that is not JSON, or none: a one-line error and exit 2 (1 means a case failed)."""
    (copied / "conformance.json").write_text("{not json")
    result = CliRunner().invoke(verify_main, [str(copied)])
    assert result.exit_code == 2 and "conformance.json is corrupt" in result.output
    (copied / "conformance.json").unlink()
    result = CliRunner().invoke(verify_main, [str(copied)])
    assert result.exit_code == 2 and "has no conformance.json" in result.output
    result = CliRunner().invoke(verify_main, [str(copied), "--backend", "coreml"])
    assert result.exit_code == 2


def test_lmn_verify_passes_and_reports(full_export):
    result = CliRunner().invoke(verify_main, [str(full_export.directory), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    precisions = {c["precision"] for c in report["cases"]}
    assert precisions == {"fp32", "int8", "int4", "dynamic-int8"} and report["passed"]
    names = {c["name"] for c in report["cases"]}
    assert {"from-empty-into-fast-paths", "prompt-then-steps", "across-2^31", "up-to-pointer-max"} <= names


def tamper(folder, change) -> None:
    path = folder / "conformance.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def shift_wide_argmax(case: dict, tolerance: dict) -> None:
    """One expected argmax changed at a step whose margin is wider than any conforming runtime's flip."""
    k = next(s for s, m in enumerate(case["argmax_margins"]) if m > 2 * tolerance["logits_atol"])
    case["argmax"][k] = (case["argmax"][k] + 1) % TINY.vocab_size


@pytest.mark.parametrize("what, change", [
    ("logit beyond tolerance", lambda d: d["cases"][0]["logits"]["0"].__setitem__(0, d["cases"][0]["logits"]["0"][0] + 1e-3)),
    ("NaN expected logit", lambda d: d["cases"][0]["logits"]["0"].__setitem__(0, float("nan"))),
    ("argmax of many steps", lambda d: d["cases"][0].update(argmax=[(a + 1) % TINY.vocab_size for a in d["cases"][0]["argmax"]])),
    ("one argmax shifted where the margin is wide", lambda d: shift_wide_argmax(d["cases"][0], d["tolerances"]["fp32"])),
    ("greedy id where the margin is wide", lambda d: next(c for c in d["cases"] if "greedy" in c)["greedy"].update(
        ids=[(i + 1) % TINY.vocab_size for i in next(c for c in d["cases"] if "greedy" in c)["greedy"]["ids"]],
        margins=[1.0] * len(next(c for c in d["cases"] if "greedy" in c)["greedy"]["ids"]))),
])
def test_lmn_verify_fails_on_a_changed_vector(copied, what, change):
    """Negative controls: each change makes lmn-verify exit 1 (the unchanged copy passes: above)."""
    tamper(copied, change)
    # the file's sha256 in lmn.json no longer matches: verify the vectors, not the seal
    rewrite(copied, lambda d: d["files"]["conformance.json"].update(
        sha256=runtime.manifest.file_digest(copied / "conformance.json"),
        bytes=runtime.manifest.file_size(copied / "conformance.json")))
    result = CliRunner().invoke(verify_main, [str(copied), "--precision", "fp32"])
    if what == "NaN expected logit":  # not JSON (no NaN there): the file cannot be checked at all, exit 2
        assert result.exit_code == 2 and "holds NaN" in result.output, result.output
        return
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_conformance_tolerances_are_stated_per_precision(full_export):
    data = json.loads((full_export.directory / "conformance.json").read_text())
    assert data["tolerances"]["fp32"]["logits_atol"] == 2e-4  # 2 x the export's 1e-4 gate against PyTorch
    assert all(copy.deepcopy(c["start_pointer"]).isdigit() for c in data["cases"])
