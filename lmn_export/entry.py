"""Console-script entry points for the torch-side commands: a one-line hint instead of a
traceback when the base (runtime-only) install runs them."""

from __future__ import annotations

import importlib
import sys


def _run(target: str, command: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(f"{command} needs PyTorch and the export tools: pip install 'lmn[export]'")
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)()


def train() -> None:
    _run("models.train:main", "lmn-train")


def export() -> None:
    _run("lmn_export.cli:main", "lmn-export")


def bench() -> None:
    _run("lmn_export.bench:main", "lmn-bench")
