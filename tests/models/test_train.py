"""lmn-train: trains, logs, checkpoints, resumes; bad input is a one-line error."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from models.checkpoint import CheckpointError, load, save
from models.train import TrainSettings, main

from .train_cli import QUICK, one_line_error, train



def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


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


# torchrun (2-process gloo DDP, then --resume across world sizes): tests/models/test_train_devices.py


def test_resume_reproduces_an_unbroken_run_bit_for_bit(tmp_path, text_file):
    """3 steps then --resume to 6 gives exactly the weights of 6 steps straight (same seed, one thread)."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert train("--data", str(text_file), "--steps", "6", "--out", str(straight), *QUICK).exit_code == 0
    assert train("--data", str(text_file), "--steps", "3", "--out", str(broken), *QUICK).exit_code == 0
    assert train("--data", str(text_file), "--steps", "6", "--out", str(broken), "--resume", *QUICK).exit_code == 0
    want, got = load(straight)[0].state_dict(), load(broken)[0].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # exact: same batches, same optimizer state, same ops
    assert logged_steps(broken) == [3, 6]
    # Negative control: the same resume without the saved optimizer state (a fresh AdamW) must differ,
    # so the gate above does see the optimizer state.
    fresh = tmp_path / "fresh"
    assert train("--data", str(text_file), "--steps", "3", "--out", str(fresh), *QUICK).exit_code == 0
    model, vocab, meta = load(fresh)
    save(fresh, model, vocab, meta["training"])  # no optimizer: config.json records none
    assert train("--data", str(text_file), "--steps", "6", "--out", str(fresh), "--resume", *QUICK).exit_code == 0
    other = load(fresh)[0].state_dict()
    assert not all(torch.equal(want[k], other[k]) for k in want)


def test_checkpoint_records_digests_and_optimizer(tmp_path, text_file):
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK).exit_code == 0
    meta = json.loads((out / "config.json").read_text())
    for name in ("model.safetensors", "optimizer.pt"):
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert meta["training"]["last_log"]["step"] == 3


def test_resume_trims_log_lines_past_the_checkpoint(tmp_path, text_file):
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK).exit_code == 0
    with open(out / "train_log.jsonl", "a") as log:  # a line from past the checkpoint, and a torn one
        log.write(json.dumps({"step": 5, "train_loss": 1.0}) + "\n" + '{"step": 6, "tra')
    assert logged_steps_or_torn(out) == [3, 5, None]  # control: the extra lines are there before resume
    assert train("--data", str(text_file), "--steps", "6", "--out", str(out), "--resume", *QUICK).exit_code == 0
    assert logged_steps(out) == [3, 6]


def logged_steps_or_torn(out: Path) -> list[int | None]:
    steps = []
    for line in (out / "train_log.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            steps.append(None)
    return steps


def test_resume_restores_a_log_line_lost_after_its_checkpoint(tmp_path, text_file):
    """A kill between the checkpoint's commit and the log append loses no line: config.json keeps it."""
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK).exit_code == 0
    (out / "train_log.jsonl").write_text("")
    assert train("--data", str(text_file), "--steps", "6", "--out", str(out), "--resume", *QUICK).exit_code == 0
    assert logged_steps(out) == [3, 6]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "optimizer.pt is corrupt"),
    ("delete", "optimizer.pt is missing"),
    ("garbage-with-digest", "optimizer.pt is unreadable"),
])
def test_bad_optimizer_state_on_resume_is_one_line(tmp_path, text_file, damage, message):
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK).exit_code == 0
    optimizer = out / "optimizer.pt"
    if damage == "truncate":
        optimizer.write_bytes(optimizer.read_bytes()[:200])
    elif damage == "delete":
        optimizer.unlink()
    else:  # bytes torch cannot read, with a digest that vouches for them: the reader itself must fail cleanly
        optimizer.write_bytes(b"PK\x03\x04 not a zip archive")
        meta = json.loads((out / "config.json").read_text())
        meta["sha256"]["optimizer.pt"] = hashlib.sha256(optimizer.read_bytes()).hexdigest()
        (out / "config.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(main, ["--data", str(text_file), "--steps", "6", "--out", str(out), "--resume", *QUICK])
    line = one_line_error(result)
    assert message in line and "restore the checkpoint" in line
    assert load(out)[2]["training"]["step"] == 3


def test_divergence_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, text_file):
    """--lr 1e6 sends the tiny model's loss to NaN within a step or two (seen at step 2)."""
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK).exit_code == 0
    before = load(out)[0].state_dict()
    result = CliRunner().invoke(main, ["--data", str(text_file), "--steps", "6", "--out", str(out), "--resume",
                                       "--lr", "1e6", *QUICK])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "NaN or infinite at step" in result.output and "lower --lr" in result.output
    after, _, meta = load(out)
    assert meta["training"]["step"] == 3 and logged_steps(out) == [3]
    assert all(torch.equal(before[k], v) and torch.isfinite(v).all() for k, v in after.state_dict().items())
    # Negative control: the same resume at the recipe's lr succeeds, so the failure above is the lr's.
    assert train("--data", str(text_file), "--steps", "6", "--out", str(out), "--resume", *QUICK).exit_code == 0


def test_divergence_on_a_fresh_run_writes_no_checkpoint(tmp_path, text_file):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["--data", str(text_file), "--steps", "6", "--out", str(out), "--lr", "1e6", *QUICK])
    assert result.exit_code != 0 and "NaN or infinite" in result.output
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


def with_option(option: str, value: str) -> list[str]:
    """QUICK with `option` set to `value` (replaced when QUICK sets it)."""
    args = list(QUICK)
    if option in args:
        args[args.index(option) + 1] = value
        return args
    return [*args, option, value]


BAD_ARGS = [
    ("--steps", "0"), ("--steps", "-3"), ("--steps", "2.5"), ("--batch", "0"), ("--block", "0"),
    ("--eval-interval", "0"), ("--eval-batches", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"),
    ("--lr", "0"), ("--lr", "fast"), ("--threads", "0"), ("--seed", "-1"), ("--seed", str(2**64)),
]


@pytest.mark.parametrize("option, value", BAD_ARGS)
def test_bad_argument_is_one_line_naming_the_option(tmp_path, text_file, option, value):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["--data", str(text_file), "--steps", "3", "--out", str(out), *with_option(option, value)])
    assert option in one_line_error(result)
    assert not out.exists()  # refused before anything is written


def test_boundary_arguments_are_accepted(tmp_path, text_file):
    """Negative control for the table above: the smallest accepted value of each option trains."""
    args = ["--preset", "tinylogmem-32", "--steps", "1", "--batch", "1", "--block", "1", "--eval-interval", "1",
            "--eval-batches", "1", "--threads", "1", "--seed", "0", "--lr", "1e-9"]
    result = train("--data", str(text_file), "--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 0, result.output


def test_out_that_is_a_file_is_one_line(tmp_path, text_file):
    out = tmp_path / "file"
    out.write_text("mine")
    line = one_line_error(CliRunner().invoke(main, ["--data", str(text_file), "--out", str(out), *QUICK]))
    assert "--out" in line and "is a file" in line
    assert out.read_text() == "mine"


@pytest.mark.parametrize("name, value", [("steps", 0), ("lr", math.nan), ("lr", -1.0), ("lr", math.inf), ("batch", 1.5),
                                         ("seed", -1), ("eval_interval", True), ("weight_decay", -0.1)])
def test_settings_validate_for_api_users(name, value):
    with pytest.raises(ValueError, match=f"TrainSettings.{name} must be"):
        TrainSettings(**{name: value})


def test_default_settings_are_valid():
    """Negative control for the test above."""
    assert TrainSettings().lr == 1e-3 and TrainSettings(steps=1, seed=0, grad_clip=0).steps == 1
