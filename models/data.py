"""Training data: text from a file or URL, the vocabularies (characters or UTF-8 bytes), prepared
(memory-mapped) corpora, and batches.

A prepared corpus is a folder written by `lmn-prepare` (models.prepare): `train.bin` and `val.bin`
hold the token ids (little-endian uint8 when the vocabulary has <= 256 ids, else uint16, no header)
and `meta.json` says how they were made. Training memory-maps the bins and reads only the windows
it samples, so a corpus of any size trains in constant memory.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from runtime import reader


class DataError(Exception):
    """Text that cannot be used for training; the message says what to do."""


VAL_FRACTION = 0.1  # the paper's split: first 90% of the tokens train, the last 10% validate
VOCAB_KINDS = ("chars", "bytes")
MAX_SYMBOLS = 65536  # token files hold uint16 ids at most

PREPARED_FORMAT = "lmn-prepared"
PREPARED_VERSION = 1
META = "meta.json"
TRAIN_BIN, VAL_BIN = "train.bin", "val.bin"


MAX_TEXT_BYTES = 1 << 30  # a text is read whole; a larger corpus goes through lmn-prepare (streamed, memory-mapped)


def load_text(source: str) -> str:
    """The UTF-8 text of a local file or an http(s) URL (fetched by models.download, as lmn-prepare does)."""
    advice = f"the text of --data is read whole; prepare a larger corpus with lmn-prepare {source} --out DIR"
    if source.startswith(("http://", "https://")):
        from .download import download  # models.download imports DataError from here: imported late, not at the top

        with tempfile.TemporaryDirectory(prefix="lmn-download-") as folder:
            download(source, Path(folder) / "text")
            raw = reader.read_bytes(Path(folder) / "text", DataError, MAX_TEXT_BYTES, what=f"text ({advice})")
    else:
        raw = reader.read_bytes(source, DataError, MAX_TEXT_BYTES, what=f"UTF-8 text file ({advice})")
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

    kind: ClassVar[str] = "chars"
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

    def describe(self) -> str:
        return f"a {len(self)}-character vocabulary"


@dataclass(frozen=True)
class ByteVocab:
    """UTF-8 bytes: a token id is a byte's value (256 ids), so any text encodes and no character is unknown.

    `chars` lists the 256 tokens as the code points U+0000..U+00FF, for display only: a byte is not
    a character, and only `decode` turns ids back into text (broken sequences become U+FFFD).
    """

    kind: ClassVar[str] = "bytes"

    @property
    def chars(self) -> tuple[str, ...]:
        return tuple(map(chr, range(256)))

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # a lone surrogate: not text any encoder can write
            raise DataError(f"the text holds {text[e.start:e.end]!r} at {e.start}, which is not a character; "
                            "pass real text") from None

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return "the byte vocabulary"


Vocab = CharVocab | ByteVocab


def vocab_fields(vocab: Vocab) -> dict[str, Any]:
    """The vocabulary as config.json and lmn.json record it: its kind, and the characters for "chars"."""
    if vocab.kind == "bytes":
        return {"vocab_kind": "bytes"}
    return {"vocab_kind": "chars", "vocab": "".join(vocab.chars)}


def vocab_from_fields(fields: dict[str, Any]) -> Vocab:
    """The vocabulary `vocab_fields` recorded; a missing kind is "chars" (files written before byte vocabularies)."""
    kind = fields.get("vocab_kind", "chars")
    if kind == "bytes":
        return ByteVocab()
    if kind != "chars":
        raise DataError(f"vocab_kind {kind!r} is not one of {VOCAB_KINDS}")
    if not isinstance(fields.get("vocab"), str):
        raise DataError("a character vocabulary needs its characters ('vocab', a string)")
    return CharVocab(tuple(fields["vocab"]))


def token_dtype(symbols: int) -> np.dtype:
    """The smallest unsigned type that holds ids of a `symbols`-token vocabulary (uint8 or uint16)."""
    if symbols > MAX_SYMBOLS:
        raise DataError(f"the text has {symbols:,} distinct characters, more than the {MAX_SYMBOLS:,} a character "
                        "vocabulary holds; use --vocab bytes")
    return np.dtype(np.uint8 if symbols <= 256 else np.uint16)


def split_point(tokens: int, val_fraction: float = VAL_FRACTION) -> int:
    """Tokens in the train split: the first 90%, rounded down."""
    return int(tokens * (1 - val_fraction))


@dataclass
class Corpus:
    """Token ids split 90/10 (first 90% train, last 10% val), as in the paper's recipe.

    The splits are 1-D numpy arrays, in memory (a text) or memory-mapped (a prepared folder);
    `batch` reads only the windows it draws.
    """

    vocab: Vocab
    train: np.ndarray  # (N_train,) uint8 or uint16 token ids
    val: np.ndarray  # (N_val,)

    @classmethod
    def from_text(cls, text: str, vocab: Vocab | None = None, val_fraction: float = VAL_FRACTION) -> "Corpus":
        vocab = vocab or CharVocab.from_text(text)
        data = np.asarray(vocab.encode(text), dtype=token_dtype(len(vocab)))  # (N,)
        n_train = split_point(len(data), val_fraction)
        return cls(vocab, data[:n_train], data[n_train:])

    def check_block(self, block: int) -> None:
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split) <= block:
                raise DataError(
                    f"the {name} split has {len(split)} tokens, too few for --block {block}; "
                    "use a longer text or a smaller --block"
                )

    @staticmethod
    def batch(split: np.ndarray, batch: int, block: int, generator: torch.Generator):
        """Random windows: inputs (batch, block) and next-token targets (batch, block), int64."""
        starts = torch.randint(len(split) - block, (batch,), generator=generator).numpy()  # (B,)
        index = starts[:, None] + np.arange(block + 1)  # (B, T+1)
        windows = torch.from_numpy(np.array(split[index], dtype=np.int64))  # (B, T+1): only these are read
        return windows[:, :-1], windows[:, 1:]


MAX_META_BYTES = 16 << 20  # a meta.json with a 65,536-character vocabulary is under 1 MB
CHECK_CHUNK = 1 << 20  # token ids checked at a time


def read_prepared(directory: Path) -> tuple[Vocab, dict[str, Any], np.ndarray, np.ndarray]:
    """(vocab, meta, train, val) of a folder `lmn-prepare` wrote; the splits memory-mapped read-only,
    checked against meta.json first (size, sha256, every id inside the vocabulary)."""
    path = directory / META
    advice = f"prepare it again with lmn-prepare SOURCE --out {directory} --force"
    if not path.exists():
        raise DataError(f"{directory} is not a prepared corpus ({META} is missing); make one with lmn-prepare")
    meta = reader.read_json(path, DataError, MAX_META_BYTES, advice, what="prepared corpus meta.json")
    try:
        if not isinstance(meta, dict) or meta.get("format") != PREPARED_FORMAT:
            raise ValueError("not an lmn-prepare meta.json")
        if meta.get("format_version") != PREPARED_VERSION:
            raise ValueError(f"format version {reader.excerpt(meta.get('format_version'))}, this lmn reads {PREPARED_VERSION}")
        vocab = vocab_from_fields(meta)
        dtype = np.dtype(meta["dtype"])
        if dtype != token_dtype(len(vocab)):
            raise ValueError(f"dtype {dtype} does not fit {vocab.describe()}")
        counts = {name: meta["tokens"][split] for name, split in ((TRAIN_BIN, "train"), (VAL_BIN, "val"))}
        digests = {name: meta["sha256"][name] for name in counts}
    except (KeyError, TypeError, ValueError, DataError) as e:
        raise DataError(f"{path} is unusable ({reader.excerpt(str(e))}); {advice}") from None
    splits = []
    for name, count in counts.items():
        file = directory / name
        if type(count) is not int or count < 1:
            raise DataError(f"{path} records {reader.excerpt(count)} tokens for {name}, not a count; {advice}")
        info = reader.regular_file(file, DataError, what=f"{name} (token ids)")
        if info.st_size != count * dtype.itemsize:
            raise DataError(f"{file} is missing or not the {count:,} tokens {META} records; {advice}")
        check_split(file, dtype.newbyteorder("<"), len(vocab), digests[name], advice)
        splits.append(np.memmap(file, dtype=dtype, mode="r", shape=(count,)))
    return vocab, meta, splits[0], splits[1]


def check_split(file: Path, dtype: np.dtype, vocab_size: int, sha256: str, advice: str) -> None:
    """One streamed pass over a split (read, not mapped: memory stays flat): its sha256 is the one
    meta.json records and every id is < vocab_size."""
    digest, position = hashlib.sha256(), 0
    with open(file, "rb") as f:
        while chunk := f.read(CHECK_CHUNK * dtype.itemsize):
            digest.update(chunk)
            ids = np.frombuffer(chunk, dtype=dtype)  # (<= CHECK_CHUNK,)
            if int(ids.max()) >= vocab_size:
                where = position + int(np.argmax(ids >= vocab_size))
                raise DataError(f"{file} holds token id {int(ids.max())} at position {where:,}, outside the "
                                f"{vocab_size}-token vocabulary of its meta.json; {advice}")
            position += len(ids)
    if digest.hexdigest() != sha256:
        raise DataError(f"{file} does not match its sha256 in meta.json (modified or corrupt); {advice}")


@dataclass
class TrainingData:
    """What `lmn-train --data` names: a text (encoded in memory) or a prepared folder (memory-mapped)."""

    source: str
    vocab: Vocab  # the vocabulary a new run trains with
    requested: str | None  # --vocab as given (None: the data's or the checkpoint's)
    text: str | None = None
    splits: tuple[np.ndarray, np.ndarray] | None = None  # a prepared folder's (train, val)

    def corpus(self, vocab: Vocab) -> Corpus:
        """The splits in `vocab` (the data's own, or a resumed checkpoint's): a prepared folder made
        with another vocabulary, or a --vocab other than the checkpoint's, is refused."""
        if self.requested not in (None, vocab.kind):
            raise DataError(f"--vocab {self.requested} does not match the checkpoint, which uses {vocab.describe()}; "
                            f"drop --vocab or pass --vocab {vocab.kind}")
        if self.splits is None:
            return Corpus.from_text(self.text, vocab)
        if vocab != self.vocab:
            raise DataError(f"{self.source} was prepared with {self.vocab.describe()} but the checkpoint uses "
                            f"{vocab.describe()}; train on the data it was trained on, or prepare it with "
                            f"--vocab {vocab.kind}")
        return Corpus(vocab, *self.splits)


def open_training_data(source: str, vocab_kind: str | None = None) -> TrainingData:
    """Open `--data`: a folder from lmn-prepare (memory-mapped), else a UTF-8 file or URL (read whole).

    `vocab_kind` ("chars", "bytes" or None) is --vocab; a text's default is "chars".
    """
    if vocab_kind not in (None, *VOCAB_KINDS):
        raise DataError(f"--vocab must be one of {VOCAB_KINDS}, got {vocab_kind!r}")
    if not source.startswith(("http://", "https://")) and Path(source).is_dir():
        vocab, _, train, val = read_prepared(Path(source))
        if vocab_kind not in (None, vocab.kind):
            raise DataError(f"{source} was prepared with {vocab.describe()}; drop --vocab, or prepare it again "
                            f"with --vocab {vocab_kind}")
        return TrainingData(source, vocab, vocab_kind, splits=(train, val))
    text = load_text(source)
    vocab = ByteVocab() if vocab_kind == "bytes" else CharVocab.from_text(text)
    token_dtype(len(vocab))
    return TrainingData(source, vocab, vocab_kind, text=text)
