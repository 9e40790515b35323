"""lmn-train: trains, logs, checkpoints, resumes; bad input is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from models.checkpoint import CheckpointError, load
from models.train import main

QUICK = ["--preset", "tinylogmem-32", "--batch", "2", "--block", "16", "--eval-interval", "3", "--eval-batches", "2", "--threads", "1"]


@pytest.fixture
def text_file(tmp_path, small_text) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(small_text, encoding="utf-8")
    return path


def train(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_train_writes_checkpoint_and_log(tmp_path, text_file, small_text):
    out = tmp_path / "run"
    result = train("--data", str(text_file), "--steps", "6", "--out", str(out), "--json", *QUICK)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["val_loss"] > 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]
    model, vocab, meta = load(out)
    assert "".join(vocab.chars) == "".join(sorted(set(small_text)))
    assert model.config.vocab_size == len(vocab)
    assert meta["training"]["step"] == 6 and meta["training"]["preset"] == "tinylogmem-32"


def test_evaluate_records_losses(tmp_path, text_file):
    out = tmp_path / "run"
    train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK)
    result = train("--data", str(text_file), "--out", str(out), "--evaluate", "--json", *QUICK)
    assert result.exit_code == 0, result.output
    _, _, meta = load(out)
    assert meta["training"]["eval_2_batches"]["val_loss"] == pytest.approx(json.loads(result.output)["val_loss"], abs=1e-4)


def test_resume_continues_to_more_steps(tmp_path, text_file):
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK).exit_code == 0
    before, _, _ = load(out)
    result = train("--data", str(text_file), "--steps", "6", "--out", str(out), "--resume", *QUICK)
    assert result.exit_code == 0, result.output
    after, _, meta = load(out)
    assert meta["training"]["step"] == 6
    assert not torch.equal(before.head.weight, after.head.weight)
    again = train("--data", str(text_file), "--steps", "6", "--out", str(out), *QUICK)
    assert again.exit_code != 0 and "already holds a checkpoint" in again.output


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), (b"", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8"), ("url", "cannot download")],
)
def test_bad_data_is_one_line_error(tmp_path, content, message):
    source = tmp_path / "data.txt"
    if content == "url":
        source = "http://127.0.0.1:9/corpus.txt"  # nothing listens on the discard port
    elif content is not None:
        source.write_bytes(content)
    result = train("--data", str(source), "--out", str(tmp_path / "run"), *QUICK)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_text_shorter_than_block_is_explained(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc" * 5)
    result = train("--data", str(path), "--out", str(tmp_path / "run"), *QUICK)
    assert result.exit_code != 0 and "too few for --block" in result.output


def test_corrupt_checkpoint_is_refused(tmp_path, text_file):
    out = tmp_path / "run"
    train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load(out)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load(tmp_path / "nowhere")


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes(tmp_path, text_file):
    """The same command under torchrun (gloo DDP): rank 0 writes one checkpoint and one log."""
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "models.train",
           "--data", str(text_file), "--steps", "4", "--out", str(out), *QUICK]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    _, _, meta = load(out)
    assert meta["training"]["world_size"] == 2 and meta["training"]["step"] == 4
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
