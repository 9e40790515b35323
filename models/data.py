"""Training text: loading from a file or URL, the character vocabulary, and batches."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(Exception):
    """Text that cannot be used for training; the message says what to do."""


def load_text(source: str, timeout: float = 30.0) -> str:
    """The UTF-8 text of a local file or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:
                raw = response.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(f"cannot download {source}: {reason}; check the URL or pass a local file") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"no such file: {source}; pass a UTF-8 text file or an http(s) URL")
        raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source} is not UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None
    if not text:
        raise DataError(f"{source} is empty; training needs some text")
    return text


@dataclass(frozen=True)
class CharVocab:
    """Characters sorted by code point; a token id is a character's index."""

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise DataError(f"characters not in the model's vocabulary: {unknown!r}")
        return [index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclass
class Corpus:
    """Encoded text split 90/10 (first 90% train, last 10% val), as in the paper's recipe."""

    vocab: CharVocab
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @classmethod
    def from_text(cls, text: str, vocab: CharVocab | None = None, val_fraction: float = 0.1) -> "Corpus":
        vocab = vocab or CharVocab.from_text(text)
        data = torch.tensor(vocab.encode(text), dtype=torch.int64)
        n_train = int(len(data) * (1 - val_fraction))
        return cls(vocab, data[:n_train], data[n_train:])

    def check_block(self, block: int) -> None:
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split) <= block:
                raise DataError(
                    f"the {name} split has {len(split)} characters, too few for --block {block}; "
                    "use a longer text or a smaller --block"
                )

    @staticmethod
    def batch(split: torch.Tensor, batch: int, block: int, generator: torch.Generator):
        """Random windows: inputs (batch, block) and next-character targets (batch, block)."""
        starts = torch.randint(len(split) - block, (batch,), generator=generator)
        windows = torch.stack([split[s : s + block + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
