"""Hostile files handed to the runtime: special files, huge files, crafted JSON and state headers,
paths that leave the export folder. Each is a one-line error of the runtime's own type, and nothing
(the stream, the folder) changes; a CLI exits 2 ("cannot run or check"), never hangs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import ManifestError, StateFileError, Stream
from runtime.chat import Chat
from runtime.conformance import ConformanceError, read_cases
from runtime.manifest import manifest_text
from runtime.reader import MAX_DEPTH, excerpt, read_json

from .state_files import forge, forge_header, header

PROMPT = "To be, or not to be"


class Refused(Exception):
    pass


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --- the one reader ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nests 65 levels deep"),
    (b'{"a": ' + b"[" * 100_000, "nests 100001 levels deep"),
    (b'{"a": ' + b"9" * 5000 + b"}", "a number of 5,000 characters"),
    (b'{"a": 1e999}', "overflows"),
    (b'{"a": Infinity}', "Infinity"),
    (b'{"a": -Infinity}', "-Infinity"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b'{"a": ', "not valid JSON"),
])
def test_bounded_json_refuses_what_could_crash_or_lie(tmp_path, text, message):
    (tmp_path / "x.json").write_bytes(text)
    with pytest.raises(Refused, match=message) as info:
        read_json(tmp_path / "x.json", Refused, 1 << 20, "fix it")
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_bounded_json_reads_what_lmn_writes(tmp_path):
    """Negative control: nesting up to the limit, long floats and big ints within 40 characters pass."""
    value = {"deep": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)), "f": -1.2345678901234567e-308,
             "i": 2**64 - 1, "s": "[[[{{{" * 100}
    (tmp_path / "x.json").write_text(json.dumps(value))
    assert read_json(tmp_path / "x.json", Refused, 1 << 20, "fix it") == value


@pytest.mark.parametrize("make, message", [
    (lambda p: fifo(p), "is a FIFO"),
    (lambda p: p.mkdir() or p, "is a directory"),
    (lambda p: sparse(p, 3 << 30), "3,221,225,472 bytes, more than the 1,048,576"),
    (lambda p: p, "no such file"),
])
def test_the_reader_refuses_special_and_huge_files_before_reading(tmp_path, make, message):
    path = make(tmp_path / "x.json")
    with pytest.raises(Refused, match=message):
        read_json(path, Refused, 1 << 20, "fix it")


def test_character_devices_are_refused(tmp_path):
    with pytest.raises(Refused, match="character device"):
        read_json(Path("/dev/zero"), Refused, 1 << 20, "fix it")


def test_an_excerpt_is_short_and_says_the_length():
    text = excerpt("x" * 400_000)
    assert len(text) < 120 and "400,000 characters" in text
    assert excerpt("short") == "'short'"


# --- state files --------------------------------------------------------------------------------


@pytest.fixture
def saved(export_dir, tmp_path):
    model = runtime.load(export_dir)
    s = Stream(model)
    s.feed(PROMPT)
    s.save(tmp_path / "x.state")
    target = Stream(model)
    target.feed("To be")
    return tmp_path / "x.state", target


def snapshot(stream: Stream):
    return ({k: np.array(v) for k, v in stream.stepper.state.items()}, np.array(stream.logits), stream.tokens_seen)


def assert_unchanged(stream: Stream, before) -> None:
    state, logits, tokens_seen = before
    assert stream.tokens_seen == tokens_seen
    np.testing.assert_array_equal(stream.logits, logits)
    for k, v in stream.stepper.state.items():
        np.testing.assert_array_equal(v, state[k])


def with_shape(path: Path, shape: str) -> bytes:
    """The file's header with its first array's shape spelled as raw JSON `shape`."""
    head = header(path)
    head["arrays"][0]["shape"] = "SHAPE"
    return json.dumps(head, sort_keys=True).encode().replace(b'"SHAPE"', shape.encode())


@pytest.mark.parametrize("shape, message", [
    ("[Infinity]", "Infinity"),
    (f"[{2**70}]", "needs more bytes than the file has"),
    ("[4294967296, 4294967296]", "needs more bytes than the file has"),
    ("[-1]", "not a list of at most 8 whole numbers"),
    ("[1.5]", "not a list of at most 8 whole numbers"),
    ("[true]", "not a list of at most 8 whole numbers"),
    ("[" * 5000 + "]" * 5000, "nests 5003 levels deep"),
    ("9" * 5000, "a number of 5,000 characters"),
])
def test_crafted_state_headers_are_state_file_errors(saved, shape, message):
    path, target = saved
    forge_header(path, with_shape(path, shape))
    before = snapshot(target)
    with pytest.raises(StateFileError, match=message):
        target.load(path)
    assert_unchanged(target, before)


@pytest.mark.parametrize("value, message", [
    (10**400, "a number of 401 characters"),
    (2**53, "not a count in"),
    (10**30, "not a count in"),
])
def test_huge_tokens_seen_is_refused(saved, value, message):
    path, target = saved
    forge(path, lambda h: h.update(tokens_seen=value))
    before = snapshot(target)
    with pytest.raises(StateFileError, match=message):
        target.load(path)
    assert_unchanged(target, before)


def test_a_header_length_past_the_file_is_refused(saved):
    path, target = saved
    data = bytearray(path.read_bytes()[:-32])
    data[8:12] = (2**32 - 1).to_bytes(4, "little")
    import hashlib
    path.write_bytes(bytes(data) + hashlib.sha256(bytes(data)).digest())
    with pytest.raises(StateFileError, match="header of 4,294,967,295 bytes"):
        target.load(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: fifo(p), "is a FIFO"),
    (lambda p: p.mkdir() or p, "is a directory"),
    (lambda p: sparse(p, 2 << 30), "2,147,483,648 bytes, more than the"),
])
def test_state_load_refuses_special_and_huge_files_unread(export_dir, tmp_path, make, message):
    target = Stream(runtime.load(export_dir))
    target.feed("To be")
    before = snapshot(target)
    with pytest.raises(StateFileError, match=message):
        target.load(make(tmp_path / "x.state"))
    assert_unchanged(target, before)


def test_chat_load_of_a_crafted_state_keeps_the_session(saved):
    path, target = saved
    forge_header(path, with_shape(path, "[Infinity]"))
    out = __import__("io").StringIO()
    chat = Chat(target, 5, 0.0, None, None, 0, out=out)
    before = snapshot(target)
    chat.command(f"/load {path}")
    chat.command(f"/load {path.parent}")
    assert out.getvalue().count("[error: ") == 2 and "is a directory" in out.getvalue()
    assert_unchanged(target, before)
    chat.command("/" + "x" * 400_000)
    assert len(out.getvalue().splitlines()[-1]) < 200


def test_an_honest_state_file_still_loads(saved):
    """Negative control for the checks above."""
    path, target = saved
    target.load(path)
    assert target.tokens_seen == len(PROMPT)


# --- export folders -----------------------------------------------------------------------------


def copy_export(export_dir, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    return copy


def rewrite(folder: Path, change) -> None:
    data = json.loads((folder / "lmn.json").read_text(encoding="utf-8"))
    change(data)
    (folder / "lmn.json").write_text(manifest_text(data), encoding="utf-8")


def point_step_graph_at(name: str):
    def change(data):
        step = next(g for g in data["graphs"] if g["name"] == "step")
        data["files"][name] = data["files"].pop(step["file"])
        step["file"] = name
    return change


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("escape", ["../outside.onnx", "ABSOLUTE", "link.onnx", "sub/../../outside.onnx"])
def test_graph_paths_that_leave_the_folder_are_refused_even_unverified(export_dir, tmp_path, verify, escape):
    copy = copy_export(export_dir, tmp_path)
    step = next(g for g in json.loads((copy / "lmn.json").read_text())["graphs"] if g["name"] == "step")
    shutil.copy(copy / step["file"], tmp_path / "outside.onnx")
    if escape == "ABSOLUTE":
        escape = str(tmp_path / "outside.onnx")
    if escape == "link.onnx":
        (copy / "link.onnx").symlink_to(tmp_path / "outside.onnx")
    rewrite(copy, point_step_graph_at(escape))
    with pytest.raises(ManifestError, match="outside the export folder"):
        runtime.load(copy, verify=verify)


def test_an_inside_graph_still_loads_unverified(export_dir, tmp_path):
    """Negative control: a renamed graph inside the folder loads with verify=False."""
    copy = copy_export(export_dir, tmp_path)
    step = next(g for g in json.loads((copy / "lmn.json").read_text())["graphs"] if g["name"] == "step")
    shutil.copy(copy / step["file"], copy / "renamed.onnx")
    rewrite(copy, point_step_graph_at("renamed.onnx"))
    assert runtime.load(copy, verify=False).step_graph["file"] == "renamed.onnx"


def test_a_huge_sparse_file_is_refused_by_size_before_hashing(export_dir, tmp_path):
    copy = copy_export(export_dir, tmp_path)
    sparse(copy / "lmn.schema.json", 3 << 30)
    with pytest.raises(ManifestError, match="has 3,221,225,472 bytes, lmn.json records"):
        runtime.load(copy)


def run_cli(name: str, *args: str, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    module = {"verify": "runtime.verify", "chat": "runtime.chat"}[name]
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


@pytest.mark.parametrize("cli", ["verify", "chat"])
def test_a_fifo_in_the_folder_does_not_hang_the_clis(export_dir, tmp_path, cli):
    copy = copy_export(export_dir, tmp_path)
    (copy / "conformance.json").unlink()
    fifo(copy / "conformance.json")
    done = run_cli(cli, str(copy), *(["--prompt", "To"] if cli == "chat" else []), timeout=60)
    assert done.returncode != 0 and "is a FIFO" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    if cli == "verify":
        assert done.returncode == 2


def test_a_folder_given_as_a_file_and_a_file_given_as_a_folder(export_dir, tmp_path):
    copy = copy_export(export_dir, tmp_path)
    (copy / "lmn.json").unlink()
    (copy / "lmn.json").mkdir()
    with pytest.raises(ManifestError, match="lmn.json is a directory"):
        runtime.load(copy)
    with pytest.raises(ManifestError, match="is a file, not an export folder"):
        runtime.load(export_dir / "lmn.json")


# --- conformance files: lmn-verify exits 2 when it cannot check -----------------------------------


def with_conformance(export_dir, tmp_path, text: str) -> Path:
    """A copy whose conformance.json is `text` (and lmn.json resealed to list it)."""
    from runtime.manifest import file_digest, file_size

    copy = copy_export(export_dir, tmp_path)
    (copy / "conformance.json").write_text(text, encoding="utf-8")
    rewrite(copy, lambda d: d["files"].update({"conformance.json": {
        "sha256": file_digest(copy / "conformance.json"), "bytes": file_size(copy / "conformance.json")}}))
    return copy


def conformance_text(export_dir, change) -> str:
    data = json.loads((export_dir / "conformance.json").read_text(encoding="utf-8"))
    change(data)
    return json.dumps(data)


def set_tolerance(value):
    def change(data):
        for tolerance in data["tolerances"].values():
            tolerance["logits_atol"] = value
    return change


@pytest.mark.parametrize("text, message", [
    (lambda e: conformance_text(e, set_tolerance("INF")).replace('"INF"', "Infinity"), "Infinity"),
    (lambda e: conformance_text(e, set_tolerance("INF")).replace('"INF"', "1e999"), "overflows"),
    (lambda e: conformance_text(e, set_tolerance(1e6)), r"logits_atol must be a number in \[0, 100\]"),
    (lambda e: conformance_text(e, set_tolerance(-1)), r"logits_atol must be a number in \[0, 100\]"),
    (lambda e: conformance_text(e, lambda d: d["cases"][0].update(tokens="abc")), "needs tokens"),
    (lambda e: conformance_text(e, lambda d: d["cases"][0].pop("argmax")), "needs argmax"),
    (lambda e: conformance_text(e, lambda d: d["cases"][0].update(start_pointer=1)), "start_pointer"),
    (lambda e: conformance_text(e, lambda d: d["cases"][0].update(precision="fp64")), "precision"),
    (lambda e: conformance_text(e, lambda d: d["cases"][0].update(tokens=[10**6])), "cannot run here"),
    (lambda e: conformance_text(e, lambda d: d["cases"].append("x")), r"case \d+ needs a name"),
    (lambda e: '{"cases": ' + "[" * 10_000 + "]" * 10_000 + "}", "nests 10001 levels deep"),
    (lambda e: '{"format": ' + "1" * 5000 + "}", "a number of 5,000 characters"),
])
def test_lmn_verify_exits_2_on_conformance_files_it_cannot_use(export_dir, tmp_path, text, message):
    copy = with_conformance(export_dir, tmp_path, text(export_dir))
    done = run_cli("verify", str(copy))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("Error: ") and len(done.stderr.strip().splitlines()) == 1
    assert __import__("re").search(message, done.stderr), done.stderr


def test_lmn_verify_passes_an_intact_copy(export_dir, tmp_path):
    """Negative control: the unchanged vectors, resealed the same way, pass."""
    copy = with_conformance(export_dir, tmp_path, (export_dir / "conformance.json").read_text(encoding="utf-8"))
    assert read_cases(copy)["cases"]
    done = run_cli("verify", str(copy))
    assert done.returncode == 0, done.stderr
