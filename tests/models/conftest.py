"""Fixtures shared by the lmn-train tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def text_file(tmp_path, small_text) -> Path:
    """`small_text` written to a file, as `--data` takes it."""
    path = tmp_path / "text.txt"
    path.write_text(small_text, encoding="utf-8")
    return path
