"""Recall: a synthetic long-range probe of how far back a trained model's memory reaches.

A passkey is written once (`#` and a digit), then `d` characters of filler, then the query `?`; the
model must predict the digit. The filler is one sentence repeated from a random phase (as in passkey
retrieval): predictable text, so that what a model must carry is the digit alone, and its training
loss is not drowned by unpredictable characters. The probe streams begin with 0-511 characters of
filler (so the key falls at every alignment of the memory's blocks) and are scored by argmax over the
ten digits (chance: 10%). Its negative controls: a windowed model is at chance once `d` passes its window, and
so is an LMN whose memory is zeroed just before the query (the answer can only come from memory).

Models learn the task from a training text of the same form (`python -m lmn_export.bench.recall`):
episodes `#v <d filler> ?v` with d log-uniform in [1, max distance], between runs of filler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

FILLER = "the grass is green and the sky is blue. "  # repeated from a random phase
DIGITS = "0123456789"
KEY, QUERY = "#", "?"
ALPHABET = "".join(sorted(set(FILLER + DIGITS + KEY + QUERY)))
DISTANCES = (256, 1024, 4096, 16384, 65536)
LEAD = 512  # probe streams start with 0..LEAD-1 characters of filler
PASS_TOKENS = 1 << 16  # tokens per parallel pass of the LMN, over all rows (bounds its activations)


@dataclass
class RecallSettings:
    checkpoints: tuple[str, ...] = ()  # folders of models trained on the probe's training text
    distances: tuple[int, ...] = DISTANCES
    probes: int = 100  # streams per distance
    seed: int = 0


def filler(rng: np.random.Generator, n: int) -> str:
    """`n` characters of the filler sentence, repeated from a random phase."""
    phase = int(rng.integers(0, len(FILLER)))
    return (FILLER * (n // len(FILLER) + 2))[phase : phase + n]


def training_text(chars: int, max_distance: int, seed: int) -> str:
    """`chars` characters of episodes `#v <d filler> ?v` (d log-uniform in [1, max_distance]), each
    after 0-63 characters of filler."""
    rng = np.random.default_rng(seed)
    parts, size = [], 0
    while size < chars:
        d = int(round(math.exp(rng.uniform(0.0, math.log(max_distance)))))
        v = DIGITS[rng.integers(0, 10)]
        episode = filler(rng, int(rng.integers(0, 64))) + KEY + v + filler(rng, d) + QUERY + v
        parts.append(episode)
        size += len(episode)
    return "".join(parts)[:chars]


def probe_batch(distance: int, probes: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(`probes` streams of equal length, the query's position in each, the digit asked for)."""
    length = LEAD + distance + 3
    streams, queries, digits = [], np.empty(probes, np.int64), np.empty(probes, np.int64)
    for r in range(probes):
        lead = int(rng.integers(0, LEAD))
        digit = int(rng.integers(0, 10))
        text = filler(rng, lead) + KEY + DIGITS[digit] + filler(rng, distance) + QUERY
        queries[r], digits[r] = len(text) - 1, digit
        streams.append(text + filler(rng, length - len(text)))
    return streams, queries, digits


def lmn_query_logits(model, tokens, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The LMN's logits at each row's query (B, V), and the same with its memory zeroed just before the
    query (the negative control). The last pass reads from the earliest query to the end (at most LEAD +
    3 tokens)."""
    import torch

    B, T = tokens.shape
    first = int(queries.min()) - 1  # every row runs in parallel mode up to here, in pieces of `chunk`
    chunk = max(64, PASS_TOKENS // B)
    rows = torch.arange(B)
    with torch.no_grad():
        state = model.init_state(B)
        for a in range(0, first, chunk):
            _, state = model(tokens[:, a : min(a + chunk, first)], return_state=True, state=state)
        tail = tokens[:, first:]
        before = torch.from_numpy(queries - first)  # tokens of the tail each row reads before its query, >= 1 (B,)
        logits, state_before = model(tail, return_state=True, state=state, lengths=before)
        answer = logits[rows, before]  # (B, V)
        state_before.memory.zero_()
        zeroed, _ = model.step(tokens[rows, torch.from_numpy(queries)], state_before)  # (B, V)
    return answer.numpy(), zeroed.numpy()


def gpt_query_logits(model, tokens, queries: np.ndarray) -> np.ndarray:
    """A GPT-2's logits at each row's query through the window of its position table ending there (B, V)."""
    import torch

    block = model.config.block_size
    with torch.no_grad():  # row by row: a query closer to the start than `block` has a shorter window
        return torch.cat([model(tokens[r : r + 1, max(0, q - block + 1) : q + 1])[:, -1]
                          for r, q in enumerate(queries.tolist())]).numpy()


def accuracy(logits: np.ndarray, digit_ids: np.ndarray, digits: np.ndarray) -> float:
    """The share of rows whose most likely digit (among the ten) is the one written."""
    return float((logits[:, digit_ids].argmax(-1) == digits).mean())


def bench_recall(s: RecallSettings, log) -> list[dict]:
    """Recall accuracy by distance for each checkpoint (LMNs also with the memory zeroed)."""
    import torch

    from models import LMN
    from models.checkpoint import load

    rows = []
    for directory in map(Path, s.checkpoints):
        model, vocab, meta = load(directory)
        missing = sorted(set(ALPHABET) - set(vocab.chars)) if hasattr(vocab, "chars") else []
        if missing:
            log(f"recall: {directory} skipped: its vocabulary lacks {''.join(missing)!r} (train it on the probe's text)")
            continue
        lmn = isinstance(model, LMN)
        cfg = model.config.to_dict()
        what = f"LMN, {cfg['max_levels']} levels" if lmn else f"GPT-2, window of {cfg['block_size']}"
        training = meta.get("training", {})
        digit_ids = np.asarray(vocab.encode(DIGITS))
        result = {"checkpoint": str(directory), "model": what, "carry": training.get("carry", 0),
                  "steps": training.get("step"), "state_bytes": state_bytes(cfg), "by_distance": []}
        for distance in s.distances:
            rng = np.random.default_rng([s.seed, distance])
            streams, queries, digits = probe_batch(distance, s.probes, rng)
            tokens = torch.tensor([vocab.encode(t) for t in streams], dtype=torch.int64)  # (B, T)
            log(f"recall: {directory.name} ({what}) at distance {distance:,} over {s.probes} probes")
            entry = {"distance": distance, "probes": s.probes}
            if lmn:
                answer, zeroed = lmn_query_logits(model, tokens, queries)
                entry |= {"accuracy": accuracy(answer, digit_ids, digits),
                          "accuracy_memory_zeroed": accuracy(zeroed, digit_ids, digits)}
            else:
                entry |= {"accuracy": accuracy(gpt_query_logits(model, tokens, queries), digit_ids, digits),
                          "kv_cache_bytes": kv_cache_bytes(cfg, distance + 2)}
            result["by_distance"].append(entry)
        rows.append(result)
    return rows


def state_bytes(cfg: dict) -> int | None:
    """An LMN's fp32 state (memory tensor and int64 pointer) for one stream; None for a GPT-2."""
    if cfg["arch"] != "lmn":
        return None
    slots = 1 + (cfg["max_levels"] - 1) * cfg["n_bank"]
    return cfg["n_layer"] * slots * cfg["n_embd"] * 4 + 8


def kv_cache_bytes(cfg: dict, tokens: int) -> int:
    """A GPT-2's fp32 KV cache holding `tokens` positions: keys and values per layer."""
    return 2 * cfg["n_layer"] * tokens * cfg["n_embd"] * 4


@click.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--chars", type=click.IntRange(min=1024, max=10**9), default=8_000_000, show_default=True,
              help="Characters of training text.")
@click.option("--max-distance", type=click.IntRange(min=1, max=10**7), default=2048, show_default=True,
              help="Largest key-to-query distance in the training text (distances are log-uniform from 1).")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True)
def main(out: Path, chars: int, max_distance: int, seed: int) -> None:
    """Write the recall probe's training text to OUT (train on it with `lmn-train --data OUT`)."""
    from runtime.atomic import write_atomic

    if out.exists():
        raise click.ClickException(f"{out} exists; give a new file name (it is never overwritten)")
    write_atomic(out, training_text(chars, max_distance, seed))
    click.echo(f"{out}: {chars:,} characters of recall episodes (distances 1..{max_distance:,}, seed {seed})")


if __name__ == "__main__":
    main()
