"""The shipped default: the runtime's packaged export is the shipped checkpoint, exported."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import runtime
from runtime.chat import main

pytestmark = pytest.mark.skipif(not (runtime.DEFAULT_EXPORT / "lmn.json").is_file(), reason="no shipped export")


def test_shipped_export_matches_shipped_checkpoint():
    torch = pytest.importorskip("torch")
    from lmn_export.parity_text import SAMPLE
    from models.checkpoint import DEFAULT_CHECKPOINT, load, sha256

    model = runtime.load()  # verifies every file hash against the manifest
    assert model.source_sha256 == sha256(DEFAULT_CHECKPOINT), "re-export: lmn-export --out runtime/default --force"
    torch_model, vocab, _ = load()
    assert "".join(vocab.chars) == model.vocab.chars
    stream, state = runtime.Stream(model), torch_model.init_state(1)
    gap = 0.0
    with torch.no_grad():
        for token in vocab.encode(SAMPLE[:128]):
            logits, state = torch_model.step(torch.tensor([token]), state)
            stream.feed_ids([token])
            gap = max(gap, float(np.abs(stream.logits - logits[0].numpy()).max()))
    assert gap < 1e-4, gap  # the export's fp32 parity bound


def test_chat_runs_the_default_with_no_folder():
    result = CliRunner().invoke(main, ["--prompt", "ROMEO:\n", "--max-tokens", "60", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert len(result.output) == 61
