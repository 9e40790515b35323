"""Reach: how far back a trained model's memory helps, as held-out loss by position on one long stream.

Each checkpoint reads the same stretch of the val split from its start: an LMN as one stream from the
empty state (parallel mode from the state the last chunk left: exactly what stepping gives, at the
speed of prefill), a GPT-2 through a sliding window of its position table (windows of `block` tokens
every block/2, each scoring its last half: every position after the first window sees between block/2
and block tokens). A memory that reaches far keeps lowering the loss at far positions; a bounded window
is flat beyond its width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BINS = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
CHUNK = 4096  # tokens per parallel pass of the LMN


@dataclass
class ReachSettings:
    checkpoints: tuple[str, ...] = ()  # folders; empty: the shipped LMN and the shipped GPT-2-32 baseline
    tokens: int = 65536  # positions scored, from the start of the val split


def default_checkpoints() -> tuple[Path, ...]:
    from models.checkpoint import DEFAULT_CHECKPOINT

    from .quality import GPT_CHECKPOINT

    return (DEFAULT_CHECKPOINT, GPT_CHECKPOINT)


def position_losses(model, ids: np.ndarray) -> np.ndarray:
    """Next-token loss (nats) at every position of `ids` but the last: (len(ids) - 1,)."""
    import torch
    import torch.nn.functional as F

    from models import LMN

    tokens = torch.from_numpy(ids.astype(np.int64)).view(1, -1)  # (1, N)
    n = tokens.shape[1] - 1
    losses = torch.empty(n)
    with torch.no_grad():
        if isinstance(model, LMN):
            state = model.init_state(1)
            for a in range(0, n, CHUNK):
                b = min(a + CHUNK, n)
                logits, state = model(tokens[:, a:b], return_state=True, state=state)  # (1, b-a, V)
                losses[a:b] = F.cross_entropy(logits[0], tokens[0, a + 1 : b + 1], reduction="none")
        else:
            block = model.config.block_size
            half = block // 2
            for a in range(0, n, half):
                lo = max(0, a + half - block)  # the window ends at a + half; it scores positions a .. a + half - 1
                b = min(a + half, n)
                logits = model(tokens[:, lo:b])  # (1, b - lo, V)
                losses[a:b] = F.cross_entropy(logits[0, a - lo :], tokens[0, a + 1 : b + 1], reduction="none")
    return losses.numpy()


def by_bins(losses: np.ndarray) -> list[dict]:
    """Mean loss per position bin [lo, hi) (bits per token), for the bins the stream reaches."""
    rows = []
    for lo, hi in zip(BINS, BINS[1:]):
        part = losses[lo:hi]
        if part.size:
            rows.append({"from": lo, "to": min(hi, len(losses)), "bpc": float(part.mean() / np.log(2)),
                         "tokens": int(part.size)})
    return rows


def bench_reach(s: ReachSettings, log) -> list[dict]:
    """Loss by position for each checkpoint on the first `s.tokens` + 1 characters of the val split."""
    from models.checkpoint import load

    from .quality import CORPUS

    if not CORPUS.is_file():
        log(f"reach: skipped (needs the corpus at {CORPUS})")
        return []
    text = CORPUS.read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9) :][: s.tokens + 1]
    rows = []
    for directory in map(Path, s.checkpoints or default_checkpoints()):
        model, vocab, meta = load(directory)
        ids = np.asarray(vocab.encode(val))
        cfg = model.config.to_dict()
        what = (f"LMN, {cfg['max_levels']} levels" if cfg["arch"] == "lmn" else
                f"GPT-2, sliding window of {cfg['block_size']}")
        training = meta.get("training", {})
        log(f"reach: {directory.name} ({what}) over {len(ids) - 1:,} positions")
        rows.append({"checkpoint": str(directory), "model": what, "carry": training.get("carry", 0),
                     "block": training.get("settings", {}).get("block"), "steps": training.get("step"),
                     "bins": by_bins(position_losses(model, ids))})
    return rows
