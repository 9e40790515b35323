"""Tiny checkpoints and one shared full export, so the export suite stays within CI's budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmn_export.export import ExportOptions, export
from lmn_export.parity_text import SAMPLE
from models import LMN, LMNConfig
from models.checkpoint import save
from models.data import CharVocab

VOCAB = CharVocab.from_text(SAMPLE)
TINY = LMNConfig(vocab_size=len(VOCAB), n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=6)


def tiny_model(seed: int = 0, **changes) -> LMN:
    torch.manual_seed(seed)
    return LMN(dataclasses.replace(TINY, **changes)).eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save(path, tiny_model(), VOCAB, {"preset": "test"})
    return path


@pytest.fixture(scope="session")
def full_export(checkpoint, tmp_path_factory):
    """ONNX step + fast paths + prefill, each quantized (int4, int8, dynamic-int8), and Core ML
    (fp32 + stateful) of the tiny checkpoint."""
    out = tmp_path_factory.mktemp("exports") / "full"
    options = ExportOptions(targets=("onnx", "coreml"), quantize=("int4", "int8", "dynamic-int8"), stateful=True,
                            prefill_sizes=(24,), parity_tokens=48)
    return export(checkpoint, out, options)
