"""Shared fixtures: tiny configs so the suite runs in minutes on two cores."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

try:  # tiny test models gain nothing from intra-op threads; one thread cuts per-op overhead ~2x
    import torch

    torch.set_num_threads(1)
except ImportError:  # a runtime-only install
    pass

DATA = Path(__file__).resolve().parent / "data"  # small exports, rebuilt by `python -m tests.data.build`
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def corpus_text() -> str:
    """The Tiny Shakespeare corpus; present in this project's CI, absent in a user's clone."""
    if not CORPUS.is_file():
        pytest.skip(f"needs the Tiny Shakespeare corpus at {CORPUS}")
    return CORPUS.read_text(encoding="utf-8")


@pytest.fixture
def small_text() -> str:
    """A few KB of generated text with a small alphabet."""
    words = ["the", "king", "shall", "speak", "and", "all", "hear", "him", "now", "o", "lord"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)).capitalize() + "." for i in range(300)]
    return "\n".join(lines) + "\n"


def committed_export(tmp_path_factory, name: str) -> Path:
    """A copy of the small export committed under tests/data (no torch needed to use it)."""
    import runtime

    source = DATA / name
    manifest = json.loads((source / "lmn.json").read_text(encoding="utf-8"))
    if manifest.get("format_version") != runtime.FORMAT_VERSION:
        pytest.fail(f"{source} is lmn.json format {manifest.get('format_version')}, this runtime reads "
                    f"{runtime.FORMAT_VERSION}: rebuild the test exports with `python -m tests.data.build`")
    copy = tmp_path_factory.mktemp(name) / name
    shutil.copytree(source, copy)
    return copy


EXPORT_CACHE_ON = True  # off while a test marked no_export_cache runs


def pytest_runtest_setup(item):
    global EXPORT_CACHE_ON
    EXPORT_CACHE_ON = item.get_closest_marker("no_export_cache") is None


@pytest.fixture(scope="session", autouse=True)
def onnx_export_cache(tmp_path_factory):
    """Each distinct ONNX graph is traced once per test run (tests/export_cache.py says what the key holds)."""
    try:
        from lmn_export import onnx_export
    except ImportError:  # a runtime-only install: nothing exports
        yield
        return
    from tests.export_cache import cached

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one folder for all workers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "_export", cached(onnx_export._export, shared / "onnx-export-cache",
                                                     lambda: EXPORT_CACHE_ON))
        yield


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return committed_export(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def other_export_dir(tmp_path_factory):
    return committed_export(tmp_path_factory, "other")


# Under qemu-user without binfmt_misc (.ci/edge-cpus sets LMN_TEST_EMULATED to say so) the emulated
# interpreter cannot start child processes (its binary is not the host's: ENOEXEC) nor open a pty:
# a test that needs one is reported as skipped with that reason, never as passed.
EMULATED = os.environ.get("LMN_TEST_EMULATED")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo.value if call.excinfo is not None else None
    if EMULATED and isinstance(error, OSError) and (error.errno == errno.ENOEXEC or "out of pty devices" in str(error)):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs a child process or a pty, "
                                                                     f"which {EMULATED} cannot start")
