"""Running lmn-train in-process and reading what a user sees (shared by the training tests)."""

from __future__ import annotations

from click.testing import CliRunner

from models.train import main

# tinylogmem-32 on 16-character windows: a few steps take well under a second.
QUICK = ["--preset", "tinylogmem-32", "--batch", "2", "--block", "16", "--eval-interval", "3", "--eval-batches", "2",
         "--threads", "1"]


def train(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result) -> str:
    """The single line of a user-facing error; fails on a traceback or a multi-line banner."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "Aborted!" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]
