"""Shared fixtures: tiny configs so the suite runs in minutes on two cores."""

from __future__ import annotations

from pathlib import Path

import pytest

try:  # tiny test models gain nothing from intra-op threads; one thread cuts per-op overhead ~2x
    import torch

    torch.set_num_threads(1)
except ImportError:  # a runtime-only install
    pass

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


def make_export(root, name: str, seed: int):
    """A tiny LMN checkpoint exported to ONNX (step + one 32-token prefill graph)."""
    import torch

    from lmn_export.export import ExportOptions, export
    from lmn_export.parity_text import SAMPLE
    from models import LMN, LMNConfig
    from models.checkpoint import save
    from models.data import CharVocab

    vocab = CharVocab.from_text(SAMPLE)
    torch.manual_seed(seed)
    model = LMN(LMNConfig(vocab_size=len(vocab), n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=8)).eval()
    save(root / f"{name}-ckpt", model, vocab)
    result = export(root / f"{name}-ckpt", root / name, ExportOptions(prefill_sizes=(32,), parity_tokens=40))
    assert result.passed
    return result.directory


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("rt"), "tiny", seed=0)


@pytest.fixture(scope="session")
def other_export_dir(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("rt2"), "other", seed=1)
