"""`lmn-prepare`: tokenize a corpus once, streaming, into a folder `lmn-train --data DIR` memory-maps.

The folder holds `train.bin` and `val.bin` (token ids, little-endian uint8 for <= 256 symbols, else
uint16, no header; the first 90% of the tokens train, the rest validate, as `lmn-train` splits a
text) and `meta.json` (format, vocabulary kind and characters, dtype, token counts, split, source,
sha256 of the bins). The text is read in chunks and never held whole: the byte vocabulary takes one
pass (UTF-8 checked as the bytes are copied), the character vocabulary two (the alphabet, then the
ids). Everything is written into a staging folder beside --out and renamed into place at the end
(runtime.atomic.staged_folder), so a failed or killed prepare never leaves a half-written folder.

Any text must be UTF-8, for the byte vocabulary too: what the model learns to write is decoded as
UTF-8, so a corpus that is not would teach it sequences that only decode to U+FFFD.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from runtime import reader
from runtime.atomic import remove_stale_folders, staged_folder, write_atomic
from runtime.reader import excerpt

from .data import (META, PREPARED_FORMAT, PREPARED_VERSION, TRAIN_BIN, VAL_BIN, VAL_FRACTION, VOCAB_KINDS, ByteVocab,
                   CharVocab, DataError, split_point, token_dtype, vocab_fields)
from .download import download, is_url, progress
from .train import OneLineErrors, Stopped, stop_on_sigterm

CHUNK = 1 << 20  # bytes read at a time: memory stays near a few chunks whatever the corpus size
CODE_POINTS = 0x110000
DOWNLOAD = "download.part"  # a URL's bytes, inside the staging folder (removed before publishing)


PREPARED_FILES = (META, TRAIN_BIN, VAL_BIN)  # all lmn-prepare writes: the only files --force may replace
MAX_META_BYTES = 16 << 20


def check_out(out: Path, force: bool, source: str) -> None:
    """Refuse an --out whose replacement could lose something lmn-prepare did not make: a folder
    that holds any file but the ones an earlier lmn-prepare wrote (with a meta.json saying so), or
    the source itself."""
    resolved = out.resolve()
    if resolved in {Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve(), *Path.cwd().resolve().parents}:
        raise DataError(f"--out {out} is the current, home, root or a parent folder; give a new folder")
    if out.is_symlink():
        raise DataError(f"--out {out} is a symlink; give the folder it points to, or another --out")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the prepared corpus")
    if not is_url(source) and Path(source).resolve().is_relative_to(resolved):
        raise DataError(f"the source {source} lies inside --out {out}, which lmn-prepare replaces; "
                        "move it out or choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        prepared = reader.read_json(out / META, DataError, MAX_META_BYTES, "").get("format") == PREPARED_FORMAT
    except (DataError, AttributeError):
        prepared = False
    if not prepared:
        raise DataError(f"--out {out} holds files that are not a prepared corpus; choose another --out")
    others = sorted(p.name for p in out.iterdir() if p.name not in PREPARED_FILES)
    if others:
        raise DataError(f"--out {out} holds files lmn-prepare did not write ({excerpt(', '.join(others))}); "
                        "move them out or choose another --out (--force replaces only a prepared corpus)")
    if not force:
        raise DataError(f"--out {out} already holds a prepared corpus; pass --force to replace it")


def utf8_chunks(path: Path, source: str, label: str, show: bool) -> Iterator[tuple[bytes, str]]:
    """(raw bytes, their text) of a file, chunk by chunk, refusing bytes that are not UTF-8.

    A character split between chunks is decoded with the chunk that completes it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f, progress(path.stat().st_size, label, show) as bar:
        while True:
            chunk = f.read(CHUNK)
            held = len(decoder.getstate()[0])  # bytes of the previous chunk's last, incomplete character
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{source} is not UTF-8 text (byte {offset - held + e.start}); convert it to "
                                "UTF-8 first") from None
            if not chunk:
                return
            yield chunk, text
            offset += len(chunk)
            bar.update(len(chunk))


def code_points(text: str) -> np.ndarray:
    """(len(text),) uint32 code points."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class SplitWriter:
    """Writes token ids to train.bin until it holds `n_train`, then to val.bin; hashes each file."""

    def __init__(self, work: Path, n_train: int, dtype: np.dtype):
        self.n_train, self.written, self.dtype = n_train, 0, dtype.newbyteorder("<")
        self.files = [open(work / TRAIN_BIN, "wb"), open(work / VAL_BIN, "wb")]
        self.digests = [hashlib.sha256(), hashlib.sha256()]

    def write(self, ids: np.ndarray) -> None:
        """Append ids (N,) in order."""
        k = min(len(ids), max(0, self.n_train - self.written))
        for i, part in enumerate((ids[:k], ids[k:])):
            if len(part):
                data = np.ascontiguousarray(part, dtype=self.dtype).tobytes()
                self.files[i].write(data)
                self.digests[i].update(data)
        self.written += len(ids)

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files:
            f.close()

    @property
    def sha256(self) -> dict[str, str]:
        return {TRAIN_BIN: self.digests[0].hexdigest(), VAL_BIN: self.digests[1].hexdigest()}


def check_split(source: str, count: int) -> int:
    """Tokens in the train split; refuses a text too short to give both splits a token."""
    n_train = split_point(count)
    if n_train < 1 or count - n_train < 1:
        raise DataError(f"{source} has {count} tokens, too few to split 90/10; use a longer text")
    return n_train


def prepare(source: str, out: Path | str, vocab_kind: str = "chars", force: bool = False,
            show_progress: bool = False) -> dict[str, Any]:
    """Tokenize `source` (a UTF-8 file or http(s) URL) into the folder `out`; returns its meta.json."""
    out = Path(out)
    if vocab_kind not in VOCAB_KINDS:
        raise DataError(f"--vocab must be one of {VOCAB_KINDS}, got {vocab_kind!r}")
    if out.parent.is_dir():
        remove_stale_folders(out)  # a killed prepare's leftovers first: a corpus it had set aside is back
    url = is_url(source)
    if not url:
        reader.regular_file(source, DataError, what="UTF-8 text file or an http(s) URL")
    check_out(out, force, source)
    with staged_folder(out) as work:
        path = work / DOWNLOAD if url else Path(source)
        if url:
            download(source, path, show_progress)
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{source} is empty; training needs some text")
        source_digest = hashlib.sha256()
        if vocab_kind == "bytes":  # one pass: the token count is the size; UTF-8 is checked while copying
            vocab, count = ByteVocab(), size
            with SplitWriter(work, check_split(source, count), token_dtype(len(vocab))) as writer:
                for chunk, _ in utf8_chunks(path, source, "tokenizing (bytes)", show_progress):
                    source_digest.update(chunk)
                    writer.write(np.frombuffer(chunk, dtype=np.uint8))  # (chunk bytes,)
        else:  # pass 1: the alphabet and the character count; pass 2: the ids
            seen, count = np.zeros(CODE_POINTS, dtype=bool), 0
            for chunk, text in utf8_chunks(path, source, "reading the alphabet", show_progress):
                seen[code_points(text)] = True
                count += len(text)
            alphabet = np.flatnonzero(seen)  # code points in order: CharVocab.from_text's order
            vocab = CharVocab(tuple(map(chr, alphabet)))
            dtype = token_dtype(len(vocab))
            lookup = np.zeros(CODE_POINTS, dtype=dtype)  # code point -> id
            lookup[alphabet] = np.arange(len(alphabet))
            with SplitWriter(work, check_split(source, count), dtype) as writer:
                for chunk, text in utf8_chunks(path, source, "tokenizing (characters)", show_progress):
                    source_digest.update(chunk)
                    writer.write(lookup[code_points(text)])  # (characters in chunk,)
        if url:
            path.unlink()
        n_train = split_point(count)
        meta = {
            "format": PREPARED_FORMAT, "format_version": PREPARED_VERSION, "created_by": "lmn-prepare 0.1.0",
            **vocab_fields(vocab), "dtype": writer.dtype.name, "byte_order": "little",
            "tokens": {"train": n_train, "val": count - n_train},
            "split": {"val_fraction": VAL_FRACTION, "rule": "the first 90% of the tokens train, the rest validate"},
            "source": {"name": source, "bytes": size, "sha256": source_digest.hexdigest()},
            "sha256": writer.sha256,
        }
        write_atomic(work / META, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


@click.command(cls=OneLineErrors)
@click.argument("source")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write (train.bin, val.bin, meta.json).")
@click.option("--vocab", "vocab_kind", type=click.Choice(VOCAB_KINDS), default="chars", show_default=True,
              help="chars: the text's characters; bytes: 256 UTF-8 byte ids, any text.")
@click.option("--force", is_flag=True, help="Replace an earlier prepared corpus in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print meta.json (and the folder) as JSON.")
def main(source, out, vocab_kind, force, as_json):
    """Tokenize SOURCE (a UTF-8 file or http(s) URL) once into --out, for lmn-train --data OUT."""
    try:
        with stop_on_sigterm():
            meta = prepare(source, out, vocab_kind, force, show_progress=True)
    except DataError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {e.filename or out}: {e.strerror or e}; nothing was changed at "
                                   f"{out} (free space, fix permissions or choose another --out)") from None
    except Stopped:
        click.echo(f"stopped by SIGTERM; nothing was changed at {out}", err=True)
        sys.exit(128 + signal.SIGTERM)
    if as_json:
        click.echo(json.dumps({"out": str(out), **meta}, ensure_ascii=False))
    else:
        tokens = meta["tokens"]
        click.echo(f"{out}: {tokens['train']:,} train + {tokens['val']:,} val tokens "
                   f"({meta['vocab_kind']}, {meta['dtype']}) from {source}")


if __name__ == "__main__":
    main()
