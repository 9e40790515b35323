"""Hostile input to lmn-prepare and lmn-train: user files in --out, broken downloads (a local
http.server on 127.0.0.1 only), prepared data that lies, extreme numbers. Each is a one-line error
that names what is wrong, and nothing the user owns is deleted or changed."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import models.download as download_module
from models.data import META, TRAIN_BIN, DataError
from models.prepare import main as prepare_main
from models.prepare import prepare
from models.train import main as train_main

from .test_prepare import QUICK, mixed_text, one_line_error


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- nothing deleted that lmn-prepare did not write ---------------------------------------------


def test_prepare_force_never_deletes_the_users_files(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    source = out / "corpus.txt"
    source.write_text(mixed_text(40), encoding="utf-8")
    with pytest.raises(DataError, match="the source .*corpus.txt lies inside --out"):
        prepare(str(source), out, force=True)
    (tmp_path / "corpus.txt").write_text(mixed_text(40), encoding="utf-8")
    prepare(str(tmp_path / "corpus.txt"), tmp_path / "prep")
    (tmp_path / "prep" / "notes.md").write_text("mine")
    before = files_of(tmp_path / "prep")
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "prep"), "--force"])
    assert "holds files lmn-prepare did not write ('notes.md')" in one_line_error(result)
    assert files_of(tmp_path / "prep") == before and files_of(out) == {"corpus.txt": source.read_bytes()}


def test_prepare_force_replaces_its_own_folder(tmp_path):
    """Negative control: a folder holding only what lmn-prepare wrote is replaced."""
    (tmp_path / "a.txt").write_text(mixed_text(40), encoding="utf-8")
    (tmp_path / "b.txt").write_text(mixed_text(60), encoding="utf-8")
    prepare(str(tmp_path / "a.txt"), tmp_path / "prep")
    meta = prepare(str(tmp_path / "b.txt"), tmp_path / "prep", force=True)
    assert meta["source"]["name"].endswith("b.txt") and sorted(files_of(tmp_path / "prep")) == sorted(
        ["meta.json", "train.bin", "val.bin"])


@pytest.mark.parametrize("make, message", [
    (lambda p: os.mkfifo(p), "is a FIFO"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: None, "no such file"),
])
def test_prepare_refuses_a_source_that_is_not_a_regular_file(tmp_path, make, message):
    make(tmp_path / "src")
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "src"), "--out", str(tmp_path / "prep")])
    assert message in one_line_error(result) and not (tmp_path / "prep").exists()


# --- networks ---------------------------------------------------------------------------------------


BODY = mixed_text(40).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY if self.path == "/ok" else BODY[: len(BODY) // 2])  # "/short": closes early

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(download_module, "BACKOFF_S", 0.01)


def test_a_truncated_download_is_retried_and_refused(server, tmp_path):
    Handler.hits.clear()
    result = CliRunner().invoke(prepare_main, [f"{server}/short", "--out", str(tmp_path / "prep")])
    line = one_line_error(result)
    assert f"cannot download {server}/short" in line and f"received {len(BODY) // 2:,} of the {len(BODY):,} bytes" in line
    assert Handler.hits["/short"] == download_module.RETRIES and not (tmp_path / "prep").exists()
    assert os.listdir(tmp_path) == []


def test_a_404_is_one_line_naming_the_url_not_a_disk_problem(server, tmp_path):
    Handler.hits.clear()
    result = CliRunner().invoke(prepare_main, [f"{server}/missing", "--out", str(tmp_path / "prep")])
    line = one_line_error(result)
    assert f"cannot download {server}/missing: HTTP 404" in line and "free space" not in line
    assert Handler.hits["/missing"] == 1  # a 4xx is not retried


def test_a_wrong_sha256_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.setitem(download_module.KNOWN_SHA256, f"{server}/ok", "0" * 64)
    with pytest.raises(DataError, match="sha256 is .*, expected 0000"):
        download_module.download(f"{server}/ok", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_train_data_url_goes_through_the_same_download(server, tmp_path):
    run = ["--steps", "1", "--out", str(tmp_path / "run"), *QUICK]
    line = one_line_error(CliRunner().invoke(train_main, ["--data", f"{server}/short", *run]))
    assert "cannot download" in line and "received" in line and not (tmp_path / "run").exists()
    assert "HTTP 404" in one_line_error(CliRunner().invoke(train_main, ["--data", f"{server}/missing", *run]))
    meta = prepare(f"{server}/ok", tmp_path / "prep")  # negative control: a whole download prepares and trains
    assert meta["source"]["sha256"] == hashlib.sha256(BODY).hexdigest()
    result = CliRunner().invoke(train_main, ["--data", f"{server}/ok", *run])
    assert result.exit_code == 0, result.output


# --- prepared data checked against its meta.json ----------------------------------------------------


@pytest.fixture
def prepared(tmp_path):
    (tmp_path / "t.txt").write_text(mixed_text(40), encoding="utf-8")
    prepare(str(tmp_path / "t.txt"), tmp_path / "prep")
    return tmp_path / "prep"


def train_on(folder: Path, tmp_path: Path):
    return CliRunner().invoke(train_main, ["--data", str(folder), "--steps", "1", "--out", str(tmp_path / "run"), *QUICK])


def test_prepared_ids_outside_the_vocabulary_are_refused_before_training(prepared, tmp_path):
    ids = np.fromfile(prepared / TRAIN_BIN, dtype=np.uint8)
    ids[-3] = 255
    ids.tofile(prepared / TRAIN_BIN)
    meta = json.loads((prepared / META).read_text())
    meta["sha256"][TRAIN_BIN] = hashlib.sha256(ids.tobytes()).hexdigest()  # a consistent, lying folder
    (prepared / META).write_text(json.dumps(meta))
    line = one_line_error(train_on(prepared, tmp_path))
    assert f"holds token id 255 at position {len(ids) - 3:,}, outside the" in line and not (tmp_path / "run").exists()


def test_prepared_bins_must_match_their_sha256(prepared, tmp_path):
    ids = np.fromfile(prepared / TRAIN_BIN, dtype=np.uint8)
    ids[0], ids[1] = ids[1], ids[0]
    if ids[0] == ids[1]:
        ids[0] = (ids[0] + 1) % 3
    ids.tofile(prepared / TRAIN_BIN)
    assert "does not match its sha256 in meta.json" in one_line_error(train_on(prepared, tmp_path))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace('"train": ', '"train": ' + "9" * 5000 + "0 * "), "a number of 5,"),
    (lambda t: t.replace('"train": ', '"train": Infinity, "x": '), "Infinity"),
    (lambda t: t.replace('"train": ', '"train": ' + "[" * 100), "levels deep"),
])
def test_crafted_meta_json_is_one_line(prepared, tmp_path, change, message):
    (prepared / META).write_text(change((prepared / META).read_text()))
    assert message in one_line_error(train_on(prepared, tmp_path))


def test_an_intact_prepared_folder_trains(prepared, tmp_path):
    """Negative control for the checks above."""
    assert train_on(prepared, tmp_path).exit_code == 0


# --- numbers at the edges ------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--grad-accum", str(2**63), "must be <= 65,536"),
    ("--steps", str(2**63), "must be <= 1,000,000,000"),
    ("--threads", str(2**63), "must be <= 1,024"),
    ("--batch", str(2**63), "must be <= 65,536"),
    ("--block", str(2**40), "must be <= 1,048,576"),
    ("--eval-batches", str(10**7), "must be <= 1,000,000"),
    ("--seed", str(2**64), "must be <= 18,446,744,073,709,551,615"),
    ("--steps", "9" * 5000, "is not a whole number"),
])
def test_huge_integer_options_are_one_line_and_create_nothing(prepared, tmp_path, option, value, message):
    args = ["--data", str(prepared), "--out", str(tmp_path / "run"), *QUICK, option, value]
    line = one_line_error(CliRunner().invoke(train_main, args))
    assert message in line and len(line) < 300 and not (tmp_path / "run").exists()


def test_resume_refuses_another_preset_and_steps_already_done_is_valid_json(prepared, tmp_path):
    run = ["--data", str(prepared), "--out", str(tmp_path / "run"), *QUICK]
    assert CliRunner().invoke(train_main, [*run, "--steps", "3"]).exit_code == 0
    before = files_of(tmp_path / "run")
    line = one_line_error(CliRunner().invoke(train_main, [*run, "--resume", "--steps", "6", "--preset", "logmem-32"]))
    assert "is a tinylogmem-32 model, not --preset logmem-32" in line
    for steps in ("3", "2"):
        result = CliRunner().invoke(train_main, [*run, "--resume", "--steps", steps, "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)  # strict JSON: no bare NaN
        assert out["nothing_to_do"] is True and out["steps_done"] == 3
        assert all(isinstance(out[k], float) for k in ("train_loss", "val_loss"))
        text = CliRunner().invoke(train_main, [*run, "--resume", "--steps", steps])
        assert "nan" not in text.stdout and "nothing to do" in text.stderr
    assert files_of(tmp_path / "run") == before
    resumed = CliRunner().invoke(train_main, [*run, "--resume", "--steps", "4", "--json"])  # negative control
    assert resumed.exit_code == 0 and "nothing_to_do" not in resumed.output
