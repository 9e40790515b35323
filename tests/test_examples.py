"""Every script in examples/ runs as a user runs it: a separate process, from another folder."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

import runtime

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"  # what examples/stream.py feeds


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["coreml_stream.py", "stream.py"]


def test_stream_example_with_the_shipped_model(tmp_path):
    """Streams 300 characters from the shipped model (about a second) and saves a state that loads back."""
    done = run_example("stream.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text, _, last = done.stdout.rstrip("\n").rpartition("\n\n")
    match = re.fullmatch(r"(\d+) tokens seen, state ([\d,]+) bytes, ([\d,]+) tokens/s", last)
    assert match, done.stdout
    model = runtime.load()
    assert len(text) == 300 and set(text) <= set(model.vocab.chars)
    seen, state_bytes = int(match[1]), int(match[2].replace(",", ""))
    assert seen == len(PROMPT) + 300  # the prompt, then each of the 300 sampled tokens fed back
    stream = runtime.Stream(model)
    assert state_bytes == stream.state_bytes  # a fixed few KB, whatever the length
    stream.load(tmp_path / "romeo.state")
    assert stream.tokens_seen == seen


def test_stream_example_errors_are_one_line(tmp_path, export_dir):
    missing = run_example("stream.py", str(tmp_path / "no-export"), cwd=tmp_path)
    assert missing.returncode == 1 and "no export folder" in missing.stderr and "Traceback" not in missing.stderr
    # the tiny test export's 43 characters lack the prompt's 'R' and 'B'
    uncovered = run_example("stream.py", str(export_dir), cwd=tmp_path)
    assert uncovered.returncode == 1 and "not in the model's vocabulary" in uncovered.stderr, uncovered.stderr
    assert "Traceback" not in uncovered.stderr and len(uncovered.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "romeo.state").exists()


@pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS the example runs Core ML (needs a Core ML export)")
@pytest.mark.parametrize("args", [(), (str(runtime.DEFAULT_EXPORT),)], ids=["default-folder", "onnx-only-export"])
def test_coreml_example_off_macos_says_so_in_one_line(args, tmp_path):
    done = run_example("coreml_stream.py", *args, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("Core ML runs only on macOS") and "examples/stream.py" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
