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


def prepare() -> None:
    # numpy would do, but the models package (its vocabularies) imports torch, and a prepared corpus
    # is only of use to lmn-train, which needs torch anyway
    _run("models.prepare:main", "lmn-prepare")


def export() -> None:
    _run("lmn_export.cli:main", "lmn-export")


def bench() -> None:
    _run("lmn_export.bench.command:main", "lmn-bench")
