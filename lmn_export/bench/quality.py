"""Held-out bits per character on the reference corpus: the LMN as one stream, the trained GPT-2-32
baseline in windows of its position table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import runtime

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
GPT_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "baselines" / "gpt2-32"
QUALITY_WINDOWS = ((0, 512), (512, 4096), (4096, 16384), (16384, 1 << 62))


def text_ids(vocab: runtime.Vocab, chars: int | None) -> tuple[list[int], list[int], str]:
    """(train-side ids for driving decode, val-split ids for quality, source) of the reference corpus."""
    if CORPUS.is_file():
        text = CORPUS.read_text(encoding="utf-8")
        split = int(len(text) * 0.9)
        val = text[split:][:chars] if chars else text[split:]
        try:
            return vocab.encode(text[:split]), vocab.encode(val), f"Tiny Shakespeare ({CORPUS.name}), val = last 10%"
        except runtime.UnknownCharacterError:
            reason = "the model's vocabulary does not cover the corpus"
    else:
        reason = f"corpus not found at {CORPUS}"
    ids = np.random.default_rng(0).integers(0, len(vocab), 200_000).tolist()
    return ids, [], f"random token ids ({reason}: quality skipped)"



def nll(logits: np.ndarray, target: int) -> float:
    z = logits.astype(np.float64)
    m = z.max()
    return float(m + np.log(np.exp(z - m).sum()) - z[target])


def bench_quality(model: runtime.ExportedModel, gpt: runtime.ExportedModel | None, val: list[int], log) -> list[dict]:
    """Held-out bits per character on the val split: the LMN as one stream (contexts far beyond its
    512-token training block); GPT-2 in independent 512-token windows (its position table's limit)."""
    if len(val) < 2:
        return []
    log(f"quality: LMN over {len(val):,} val characters as one stream")
    stream = runtime.Stream(model)
    losses = np.zeros(len(val) - 1)
    for i in range(len(val) - 1):
        stream.feed_ids([val[i]])
        losses[i] = nll(stream.logits, val[i + 1])
    rows = []
    for lo, hi in QUALITY_WINDOWS:
        part = losses[lo:hi]
        if part.size:
            rows.append({"test": "quality", "model": "lmn", "context": f"{lo + 1}-{min(hi, len(val) - 1)}",
                         "bpc": float(part.mean() / np.log(2)), "tokens": int(part.size)})
    rows.append({"test": "quality", "model": "lmn", "context": "all", "bpc": float(losses.mean() / np.log(2)),
                 "tokens": int(losses.size)})
    if gpt is not None:
        block = gpt.config["block_size"]
        log(f"quality: GPT-2 over the same text in {block}-token windows")
        glosses = []
        for start in range(0, len(val) - 1, block):
            s = runtime.Stream(gpt)
            for i in range(start, min(start + block, len(val) - 1)):
                s.feed_ids([val[i]])
                glosses.append(nll(s.logits, val[i + 1]))
        rows.append({"test": "quality", "model": "gpt2", "context": f"1-{block} (windows)",
                     "bpc": float(np.mean(glosses) / np.log(2)), "tokens": len(glosses)})
    return rows


def trained_gpt_export(work: Path, log) -> runtime.ExportedModel:
    """The shipped, trained GPT-2-32 baseline, exported (full-cache step) for the quality test."""
    from ..export import ExportOptions, export

    log("exporting the trained GPT-2-32 baseline for the quality test")
    export(GPT_CHECKPOINT, work / "gpt2-32", ExportOptions(prefill_sizes=(), parity_tokens=64))
    return runtime.load(work / "gpt2-32")


