"""lmn-train loses nothing to a kill: SIGKILL or SIGTERM at each phase of a checkpoint write leaves
the old checkpoint or the new one, whole, and --resume then finishes the run as if nothing happened."""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from models import checkpoint
from models.checkpoint import COMMIT, CheckpointError, load, locked, recover, save
from models.train import main
from runtime.atomic import TEMP_MARK

from .train_cli import train

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]
PAUSED_TRAIN = Path(__file__).with_name("paused_train.py")
QUICK = ["--preset", "tinylogmem-32", "--batch", "2", "--block", "16", "--eval-interval", "1", "--eval-batches", "1",
         "--threads", "1"]
PAUSE_TIMEOUT_S = 120  # a cold torch import plus two tiny steps on a loaded 2-core CI box; seen at ~5 s


@pytest.fixture
def straight(tmp_path, text_file) -> dict[str, torch.Tensor]:
    """Weights of an unbroken 3-step run: what every interrupted-then-resumed run must end with."""
    out = tmp_path / "straight"
    assert train("--data", str(text_file), "--steps", "3", "--out", str(out), *QUICK).exit_code == 0
    return load(out)[0].state_dict()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if TEMP_MARK in p.name or p.name == COMMIT)


def start_paused(out: Path, text_file: Path, phase: str) -> subprocess.Popen:
    """lmn-train --resume to step 3, stopped at `phase` of the step-2 checkpoint write (tests/models/paused_train.py)."""
    cmd = [sys.executable, str(PAUSED_TRAIN), phase, "--data", str(text_file), "--steps", "3", "--out", str(out),
           "--resume", *QUICK]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, f"paused at {phase}")
    return proc


def wait_for_line(proc: subprocess.Popen, marker: str) -> None:
    seen, deadline = "", time.monotonic() + PAUSE_TIMEOUT_S
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        while marker not in seen:
            if time.monotonic() > deadline or not selector.select(timeout=1) and proc.poll() is not None:
                proc.kill()
                pytest.fail(f"the writer never reached '{marker}': {seen[-2000:]}")
            seen += proc.stderr.readline()


def assert_whole(out: Path, step: int) -> None:
    """`out` loads, at `step`, and its files are the ones config.json's digests vouch for."""
    _, _, meta = load(out)
    assert meta["training"]["step"] == step
    for name in ("model.safetensors", "optimizer.pt"):
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name


def assert_resumes_to(out: Path, text_file: Path, straight: dict[str, torch.Tensor]) -> None:
    result = train("--data", str(text_file), "--steps", "3", "--out", str(out), "--resume", *QUICK)
    assert result.exit_code == 0, result.output
    weights = load(out)[0].state_dict()
    assert all(torch.equal(straight[k], weights[k]) for k in straight)  # exact: resume replays the same steps
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


# Each phase and the checkpoint a reader must find after a kill there: before the commit point the
# step-1 checkpoint, after it the step-2 one.
PHASES = [("staged", 1), ("committed", 2), ("moving", 2)]


@pytest.mark.parametrize("phase, step", PHASES)
def test_sigkill_during_checkpoint_leaves_one_whole_checkpoint(tmp_path, text_file, straight, phase, step):
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "1", "--out", str(out), *QUICK).exit_code == 0
    proc = start_paused(out, text_file, phase)
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()
    assert leftovers(out)  # control: the kill did leave a half-done write behind
    assert_whole(out, step)
    assert leftovers(out) == []  # load() recovered the folder
    assert_resumes_to(out, text_file, straight)


@pytest.mark.parametrize("phase, step", [("staged", 1), ("moving", 2)])
def test_sigterm_during_checkpoint_cleans_up(tmp_path, text_file, straight, phase, step):
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "1", "--out", str(out), *QUICK).exit_code == 0
    proc = start_paused(out, text_file, phase)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert leftovers(out) == []  # checked before any reader could recover the folder
    assert_whole(out, step)
    assert_resumes_to(out, text_file, straight)


def test_recover_spares_a_live_writers_staging_folder(tmp_path):
    staging = tmp_path / f".checkpoint{TEMP_MARK}live"
    staging.mkdir()
    with locked(staging):
        recover(tmp_path)
        assert staging.is_dir()  # its writer (this lock) is alive
    recover(tmp_path)
    assert not staging.exists()  # control: once the writer is gone it is removed


def test_full_disk_mid_checkpoint_keeps_the_old_one(tmp_path, text_file, monkeypatch):
    out = tmp_path / "run"
    assert train("--data", str(text_file), "--steps", "1", "--out", str(out), *QUICK).exit_code == 0
    model, vocab, meta = load(out)
    before = (out / "model.safetensors").read_bytes()
    calls = []

    def full_after_one(path, data):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return write(path, data)

    write = checkpoint.write_atomic
    monkeypatch.setattr(checkpoint, "write_atomic", full_after_one)
    torch.nn.init.zeros_(model.head.weight)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint.*intact"):
        save(out, model, vocab, meta["training"], optimizer={"state": {}, "param_groups": []})
    assert leftovers(out) == [] and (out / "model.safetensors").read_bytes() == before
    assert_whole(out, 1)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores directory modes, so a chmod 0o555 folder stays writable for it")
def test_read_only_out_is_one_line(tmp_path, text_file):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = CliRunner().invoke(main, ["--data", str(text_file), "--steps", "1", "--out", str(out), *QUICK])
    finally:
        out.chmod(0o755)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "not writable" in result.output
    assert list(out.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no one may create a folder")
def test_uncreatable_out_is_one_line(text_file):
    """Works as root too: nobody can mkdir in /proc."""
    result = CliRunner().invoke(main, ["--data", str(text_file), "--steps", "1", "--out", "/proc/lmn-train-test", *QUICK])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot create it" in lines[0] and "/proc/lmn-train-test" in lines[0]
