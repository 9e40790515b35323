"""lmn-prepare and lmn-train --data DIR: a corpus tokenized once, streamed, memory-mapped; the byte vocabulary.

Token files are compared exactly (tolerance 0: they are integers). The big-file test bounds peak
resident memory; its threshold and reasons are stated there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import models.prepare as prepare_module
from models.checkpoint import CONFIG, SMALL_CHECKPOINT, CheckpointError, load, save
from models.data import (META, TRAIN_BIN, VAL_BIN, ByteVocab, CharVocab, Corpus, open_training_data,
                         split_point)
from models.prepare import main as prepare_main
from models.prepare import prepare
from models.train import main as train_main
from runtime.atomic import STAGING_MARK, TEMP_MARK

QUICK = ["--preset", "tinylogmem-32", "--batch", "2", "--block", "16", "--eval-interval", "3", "--eval-batches", "1",
         "--threads", "1"]
WIDE = "é中😀"  # 2, 3 and 4 UTF-8 bytes


def mixed_text(lines: int = 200) -> str:
    words = ["the", "king", "café", "中文", "smile😀", "naïve", "o", "lord"]
    return "".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(7)) + ".\n" for i in range(lines))


def one_line_error(result) -> str:
    """The single line of a user-facing error; fails on a traceback or a usage banner."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "Usage:" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name)


def tokens_of(directory: Path) -> np.ndarray:
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
    return np.concatenate([np.fromfile(directory / name, dtype=meta["dtype"]) for name in (TRAIN_BIN, VAL_BIN)])


@pytest.mark.parametrize("kind", ["chars", "bytes"])
def test_prepare_round_trips_the_text(tmp_path, monkeypatch, kind):
    """decode(train.bin + val.bin) is the text; the split, vocabulary and tokens are what lmn-train's
    in-memory path makes of the same text. 7-byte chunks put characters across chunk boundaries."""
    monkeypatch.setattr(prepare_module, "CHUNK", 7)
    text = mixed_text(40)
    source = tmp_path / "text.txt"
    source.write_text(text, encoding="utf-8")
    meta = prepare(str(source), tmp_path / "prep", kind)
    out = tmp_path / "prep"
    vocab = ByteVocab() if kind == "bytes" else CharVocab.from_text(text)
    ids = tokens_of(out)
    assert vocab.decode(ids.tolist()) == text
    assert meta["vocab_kind"] == kind and meta["dtype"] == "uint8"
    assert meta.get("vocab") == (None if kind == "bytes" else "".join(vocab.chars))
    count = len(text.encode()) if kind == "bytes" else len(text)
    assert meta["tokens"] == {"train": split_point(count), "val": count - split_point(count)}
    for name in (TRAIN_BIN, VAL_BIN):
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert meta["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    in_memory = Corpus.from_text(text, vocab)
    data = open_training_data(str(out))
    assert data.vocab == vocab
    prepared = data.corpus(vocab)
    assert isinstance(prepared.train, np.memmap) and isinstance(prepared.val, np.memmap)
    np.testing.assert_array_equal(prepared.train, in_memory.train)
    np.testing.assert_array_equal(prepared.val, in_memory.val)
    assert sorted(p.name for p in out.iterdir()) == [META, TRAIN_BIN, VAL_BIN]  # no staging mark, no download
    assert temp_leftovers(tmp_path) == []


def test_batches_read_windows_of_the_memory_map(tmp_path):
    """Corpus.batch on a memory-mapped split draws what it draws from the same tokens in memory."""
    text = mixed_text(60)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    prepare(str(tmp_path / "t.txt"), tmp_path / "prep", "bytes")
    prepared = open_training_data(str(tmp_path / "prep")).corpus(ByteVocab())
    in_memory = Corpus.from_text(text, ByteVocab())
    for seed in range(3):
        x, y = Corpus.batch(prepared.train, 4, 16, torch.Generator().manual_seed(seed))
        x2, y2 = Corpus.batch(in_memory.train, 4, 16, torch.Generator().manual_seed(seed))
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens


def test_more_than_256_characters_use_uint16_and_more_than_65536_are_refused(tmp_path):
    many = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 300)) * 4
    (tmp_path / "many.txt").write_text(many, encoding="utf-8")
    meta = prepare(str(tmp_path / "many.txt"), tmp_path / "prep", "chars")
    assert meta["dtype"] == "uint16"
    assert CharVocab(tuple(meta["vocab"])).decode(tokens_of(tmp_path / "prep").tolist()) == many
    too_many = "".join(chr(c) for c in [*range(0x20, 0xD800), *range(0xE000, 0x12000)])  # no surrogates
    assert len(set(too_many)) > 65536
    (tmp_path / "too_many.txt").write_text(too_many, encoding="utf-8")
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "too_many.txt"), "--out", str(tmp_path / "p2")])
    assert "more than the 65,536 a character vocabulary holds; use --vocab bytes" in one_line_error(result)
    assert not (tmp_path / "p2").exists() and temp_leftovers(tmp_path) == []
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "too_many.txt"), "--out", str(tmp_path / "p2"),
                                               "--vocab", "bytes"])
    assert result.exit_code == 0, result.output  # the byte vocabulary takes any text


@pytest.mark.parametrize("content, vocab, message", [
    (None, "chars", "no such file"),
    (b"", "chars", "is empty"),
    (b"", "bytes", "is empty"),
    (b"good text\n" * 50 + b"\xff\xfe bad", "chars", "is not UTF-8 text (byte 500)"),
    (b"good text\n" * 50 + b"\xff\xfe bad", "bytes", "is not UTF-8 text (byte 500)"),  # bytes too: see README
    (b"good text\n" * 50 + "é".encode()[:1], "bytes", "is not UTF-8 text (byte 500)"),  # cut inside a character
    (b"a", "chars", "too few to split 90/10"),
])
def test_bad_sources_are_one_line_errors_and_leave_nothing(tmp_path, monkeypatch, content, vocab, message):
    monkeypatch.setattr(prepare_module, "CHUNK", 64)  # the bad byte lies chunks after the first write
    source = tmp_path / "source.txt"
    if content is not None:
        source.write_bytes(content)
    result = CliRunner().invoke(prepare_main, [str(source), "--out", str(tmp_path / "prep"), "--vocab", vocab])
    assert message in one_line_error(result)
    assert not (tmp_path / "prep").exists() and temp_leftovers(tmp_path) == []


def test_out_is_replaced_only_when_it_is_a_prepared_corpus_and_forced(tmp_path):
    (tmp_path / "a.txt").write_text(mixed_text(20), encoding="utf-8")
    (tmp_path / "b.txt").write_text("other text, other letters: xyz\n" * 20, encoding="utf-8")
    out = tmp_path / "prep"
    prepare(str(tmp_path / "a.txt"), out)
    before = tokens_of(out)
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "b.txt"), "--out", str(out)])
    assert "already holds a prepared corpus; pass --force" in one_line_error(result)
    np.testing.assert_array_equal(tokens_of(out), before)
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "b.txt"), "--out", str(out), "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["source"]["name"] == str(tmp_path / "b.txt")
    assert CharVocab(tuple(json.loads((out / META).read_text())["vocab"])).decode(tokens_of(out).tolist()) == \
        (tmp_path / "b.txt").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "a.txt"), "--out", str(mine), "--force"])
    assert "not a prepared corpus" in one_line_error(result)
    assert (mine / "notes.txt").read_text() == "keep me"
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "a.txt"), "--out", str(mine / "notes.txt")])
    assert "is a file" in one_line_error(result)
    assert temp_leftovers(tmp_path) == []


def test_prepare_from_a_url_and_bad_urls(tmp_path):
    """A URL is streamed to the staging folder and prepared like the file it serves; nothing of the
    download stays. Nothing listens on the discard port (negative control): a one-line error."""
    import functools
    import http.server
    import threading

    text = mixed_text(30)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "t.txt").write_text(text, encoding="utf-8")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/t.txt"
        meta = prepare(url, tmp_path / "prep", "bytes")
    finally:
        server.shutdown()
        server.server_close()
    assert ByteVocab().decode(tokens_of(tmp_path / "prep").tolist()) == text
    assert meta["source"] == {"name": url, "bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == [META, TRAIN_BIN, VAL_BIN]
    result = CliRunner().invoke(prepare_main, ["http://127.0.0.1:9/t.txt", "--out", str(tmp_path / "p2")])
    assert "cannot download http://127.0.0.1:9/t.txt" in one_line_error(result)
    assert not (tmp_path / "p2").exists() and temp_leftovers(tmp_path) == []


def test_a_damaged_prepared_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "t.txt").write_text(mixed_text(40), encoding="utf-8")
    prep = tmp_path / "prep"
    prepare(str(tmp_path / "t.txt"), prep, "bytes")
    run = ["--steps", "1", "--out", str(tmp_path / "run"), *QUICK]
    with open(prep / TRAIN_BIN, "r+b") as f:
        f.truncate(100)
    result = CliRunner().invoke(train_main, ["--data", str(prep), *run])
    assert "train.bin is missing or not the" in one_line_error(result) and "lmn-prepare" in result.output
    (prep / META).write_text("{")
    assert "meta.json is corrupt" in one_line_error(CliRunner().invoke(train_main, ["--data", str(prep), *run]))
    (prep / META).unlink()
    assert "is not a prepared corpus" in one_line_error(CliRunner().invoke(train_main, ["--data", str(prep), *run]))
    assert not (tmp_path / "run" / CONFIG).exists()


def test_a_killed_prepare_is_cleaned_up_by_the_next(tmp_path):
    """What a SIGKILL leaves (a staging folder of a dead process; a replaced folder set aside) is
    removed, or put back, by the next prepare to the same place; a live writer's folder is spared."""
    (tmp_path / "a.txt").write_text(mixed_text(20), encoding="utf-8")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = tmp_path / f".prep{TEMP_MARK}{dead.pid}-abc"
    staging.mkdir()
    (staging / STAGING_MARK).write_bytes(b"")
    (staging / TRAIN_BIN).write_bytes(b"half")
    live = tmp_path / f".prep{TEMP_MARK}{os.getpid()}-live"
    live.mkdir()
    (live / STAGING_MARK).write_bytes(b"")
    set_aside = tmp_path / f".prep{TEMP_MARK}{dead.pid}-xyz-old"
    prepare(str(tmp_path / "a.txt"), set_aside)  # stands in for the corpus a killed --force had set aside
    before = tokens_of(set_aside)
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "a.txt"), "--out", str(tmp_path / "prep")])
    assert "already holds a prepared corpus" in one_line_error(result)  # the set-aside corpus is back
    np.testing.assert_array_equal(tokens_of(tmp_path / "prep"), before)
    assert not staging.exists() and not set_aside.exists()
    assert live.exists()  # its writer (this process) is alive
    result = CliRunner().invoke(prepare_main, [str(tmp_path / "a.txt"), "--out", str(tmp_path / "prep"), "--force"])
    assert result.exit_code == 0, result.output
    assert temp_leftovers(tmp_path) == [live.name]


def test_train_on_a_prepared_folder_and_resume_checks_the_vocabulary(tmp_path):
    text = mixed_text(80)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    prepare(str(tmp_path / "t.txt"), tmp_path / "bytes", "bytes")
    prepare(str(tmp_path / "t.txt"), tmp_path / "chars", "chars")
    run = tmp_path / "run"
    result = CliRunner().invoke(train_main, ["--data", str(tmp_path / "bytes"), "--steps", "3", "--out", str(run),
                                             "--json", *QUICK])
    assert result.exit_code == 0, result.output
    model, vocab, meta = load(run)
    assert isinstance(vocab, ByteVocab) and model.config.vocab_size == 256
    assert json.loads((run / CONFIG).read_text())["vocab_kind"] == "bytes"
    assert "vocab" not in json.loads((run / CONFIG).read_text())
    # a prepared folder made with another vocabulary: one line, nothing trained
    result = CliRunner().invoke(train_main, ["--data", str(tmp_path / "chars"), "--steps", "6", "--out", str(run),
                                             "--resume", *QUICK])
    chars = len(CharVocab.from_text(text))
    assert f"was prepared with a {chars}-character vocabulary but the checkpoint uses the byte vocabulary" in \
        one_line_error(result)
    result = CliRunner().invoke(train_main, ["--data", str(tmp_path / "t.txt"), "--vocab", "chars", "--steps", "6",
                                             "--out", str(run), "--resume", *QUICK])
    assert "--vocab chars does not match the checkpoint" in one_line_error(result)
    result = CliRunner().invoke(train_main, ["--data", str(tmp_path / "bytes"), "--vocab", "chars", "--steps", "3",
                                             "--out", str(tmp_path / "run2"), *QUICK])
    assert "prepared with the byte vocabulary; drop --vocab" in one_line_error(result)
    assert load(run)[2]["training"]["step"] == 3
    # the matching data resumes: the prepared folder, or the text itself with the checkpoint's vocabulary
    result = CliRunner().invoke(train_main, ["--data", str(tmp_path / "bytes"), "--steps", "6", "--out", str(run),
                                             "--resume", *QUICK])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(train_main, ["--data", str(tmp_path / "t.txt"), "--steps", "9", "--out", str(run),
                                             "--resume", *QUICK])
    assert result.exit_code == 0, result.output
    assert load(run)[2]["training"]["step"] == 9


def test_text_with_vocab_bytes_trains_like_its_prepared_folder(tmp_path):
    """--data FILE --vocab bytes and --data DIR (the same text prepared) draw the same tokens: same losses."""
    (tmp_path / "t.txt").write_text(mixed_text(80), encoding="utf-8")
    prepare(str(tmp_path / "t.txt"), tmp_path / "prep", "bytes")
    losses = []
    for data, extra in ((tmp_path / "t.txt", ["--vocab", "bytes"]), (tmp_path / "prep", [])):
        out = tmp_path / f"run-{len(losses)}"
        result = CliRunner().invoke(train_main, ["--data", str(data), *extra, "--steps", "3", "--out", str(out),
                                                 "--json", *QUICK])
        assert result.exit_code == 0, result.output
        losses.append(json.loads(result.output.strip().splitlines()[-1]))
        assert isinstance(load(out)[1], ByteVocab)
    assert losses[0]["train_loss"] == losses[1]["train_loss"]  # same data, same seed: bit-identical


def test_old_checkpoints_load_as_characters(tmp_path):
    """A config.json with a plain string vocab and no vocab_kind (every checkpoint before byte
    vocabularies, the small shipped LogMem-32 included) loads as a character vocabulary."""
    model, vocab, meta = load(SMALL_CHECKPOINT)  # written before byte vocabularies
    assert isinstance(vocab, CharVocab) and "vocab_kind" not in meta and len(vocab) == model.config.vocab_size
    save(tmp_path / "ckpt", model, vocab)
    config = json.loads((tmp_path / "ckpt" / CONFIG).read_text(encoding="utf-8"))
    assert config["vocab_kind"] == "chars"
    del config["vocab_kind"]
    (tmp_path / "ckpt" / CONFIG).write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    assert load(tmp_path / "ckpt")[1] == vocab
    config["vocab_kind"] = "words"  # negative control: an unknown kind is refused, not guessed
    (tmp_path / "ckpt" / CONFIG).write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(CheckpointError, match="vocab_kind 'words'"):
        load(tmp_path / "ckpt")


# Runs a module (or -c code) and writes its own peak resident memory (VmHWM, KB) to $LMN_TEST_HWM at
# exit. Not ru_maxrss: Linux carries the forking process's peak (pytest with torch, ~300 MB) into a
# child's ru_maxrss across fork and exec, while VmHWM belongs to the new program's memory alone.
LAUNCHER = """
import atexit, os, runpy, sys
def report():
    with open('/proc/self/status') as f:
        hwm = next(line.split()[1] for line in f if line.startswith('VmHWM:'))
    with open(os.environ['LMN_TEST_HWM'], 'w') as f:
        f.write(hwm)
atexit.register(report)
if sys.argv[1] == '-c':
    exec(sys.argv[2])
else:
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def peak_rss_kb(args: list[str], cwd: Path) -> int:
    """Peak resident memory (KB) of `python -m args...` (or `python -c code`), as the process saw it."""
    report = cwd / "hwm.txt"
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "LMN_TEST_HWM": str(report)})
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    return int(report.read_text())


@pytest.mark.slow_io
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_a_corpus_larger_than_memory_growth_trains_in_constant_memory(tmp_path):
    """A 300 MB text is prepared (bytes) and trained on; each command's peak RSS grows by less than a
    quarter of the file over the same command on a tiny corpus.

    Threshold: growth < 75 MB (size / 4). torch's own footprint (~300-400 MB) is a constant both runs
    share, so only the difference is compared. A prepare or a trainer that held the corpus would grow
    by >= 300 MB (an int64 tensor of it, as lmn-train builds for a text, by 2.4 GB); chunked reads and
    the sampled windows of a memory map stay within a few MB. Negative control: a process that
    reads train.bin whole is measured to grow by about its size, so the measure can see a read.
    """
    if shutil.disk_usage(tmp_path).free < 1 << 30:
        pytest.skip("needs 1 GB free under the temp folder (300 MB text + 300 MB prepared)")
    size = 300 << 20
    block = (mixed_text(200) * 200).encode()[: 1 << 20]
    block = block[: len(block.decode("utf-8", errors="ignore").encode())]  # end on a whole character
    big, tiny = tmp_path / "big.txt", tmp_path / "tiny.txt"
    with open(big, "wb") as f:
        while f.tell() + len(block) <= size:
            f.write(block)
    size = big.stat().st_size
    tiny.write_bytes(block[:20_000])
    rss = {}
    for name, source in (("tiny", tiny), ("big", big)):
        rss[f"prepare-{name}"] = peak_rss_kb(["models.prepare", str(source), "--out", f"prep-{name}", "--vocab",
                                              "bytes"], tmp_path)
        rss[f"train-{name}"] = peak_rss_kb(["models.train", "--data", f"prep-{name}",
                                            "--preset", "tinylogmem-32", "--batch", "2", "--block", "16", "--steps",
                                            "3", "--eval-interval", "1000", "--eval-batches", "1", "--threads", "1",
                                            "--out", f"run-{name}"], tmp_path)
    train_bin = tmp_path / "prep-big" / TRAIN_BIN
    assert train_bin.stat().st_size == split_point(size)
    rss["read-none"] = peak_rss_kb(["-c", "pass"], tmp_path)
    rss["read-whole"] = peak_rss_kb(["-c", f"data = open({str(train_bin)!r}, 'rb').read()"], tmp_path)
    print({k: f"{v / 1024:.0f} MB" for k, v in rss.items()})
    limit_kb = size / 4 / 1024
    assert rss["read-whole"] - rss["read-none"] > 0.9 * train_bin.stat().st_size / 1024  # the measure sees a read
    assert rss["prepare-big"] - rss["prepare-tiny"] < limit_kb, rss
    assert rss["train-big"] - rss["train-tiny"] < limit_kb, rss
    assert load(tmp_path / "run-big")[2]["training"]["step"] == 3
