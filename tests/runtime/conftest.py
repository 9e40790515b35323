"""A tiny export folder (ONNX step + prefill) for runtime tests."""

from __future__ import annotations

import pytest

from lmn_export.export import ExportOptions, export
from lmn_export.parity_text import SAMPLE
from models import LMN, LMNConfig
from models.checkpoint import save
from models.data import CharVocab

VOCAB = CharVocab.from_text(SAMPLE)


def make_export(root, name: str, seed: int):
    import torch

    torch.manual_seed(seed)
    model = LMN(LMNConfig(vocab_size=len(VOCAB), n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=8)).eval()
    save(root / f"{name}-ckpt", model, VOCAB)
    result = export(root / f"{name}-ckpt", root / name, ExportOptions(prefill_sizes=(32,), parity_tokens=40))
    assert result.passed
    return result.directory


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("rt"), "tiny", seed=0)


@pytest.fixture(scope="session")
def other_export_dir(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("rt2"), "other", seed=1)
