"""Checkpoints: `model.safetensors` (and `optimizer.pt`, when training saved one) beside
`config.json` (model config, vocabulary, training facts, and the sha256 of the other two files).

The vocabulary is recorded as `vocab_kind` ("chars" or "bytes") and, for characters, `vocab` (the
characters in id order); a config.json without `vocab_kind` (written before byte vocabularies) is
a character vocabulary.

A checkpoint is replaced as one unit. The new files are written, fsynced, into a private staging
folder inside the checkpoint folder (`.checkpoint` + TEMP_MARK + random); renaming that folder to
`.checkpoint-commit` is the commit point; its files are then moved over the old ones and the
commit folder is removed. `recover` finishes a commit that a killed writer left half done and
removes staging folders that no live writer holds (a writer holds an flock on its staging folder
until it is done), so after a kill at any instant a reader finds the old checkpoint or the new
one, whole. Every reader of a checkpoint folder (`read_meta`, `load`) recovers it first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from runtime import reader
from runtime.atomic import TEMP_MARK, fsync_directory, write_atomic

from . import build_model
from .config import ConfigError, config_from_dict
from .data import DataError, Vocab, vocab_fields, vocab_from_fields

try:
    import fcntl
except ImportError:  # Windows: no flock; recovery then treats every staging folder as abandoned
    fcntl = None

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.pt"
UNIT = (WEIGHTS, OPTIMIZER, CONFIG)  # the order a commit moves them in
COMMIT = ".checkpoint-commit"
STAGING_PREFIX = f".checkpoint{TEMP_MARK}"
DIGESTS = "sha256"  # config.json key: {file name: sha256 hex} of the files saved with it
DEFAULT_CHECKPOINT = Path(__file__).parent / "default"  # the shipped model lmn-export exports by default
SMALL_CHECKPOINT = Path(__file__).parent / "logmem-32"  # the small shipped model (LogMem-32): tests, quick runs
MAX_CONFIG_BYTES = 16 << 20  # a config.json with a 65,536-character vocabulary is under 1 MB
MAX_WEIGHTS_BYTES = 16 << 30  # far above any preset (the largest is tens of MB); refuses a sparse or endless file

class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded or written; the message says what to do."""


def save(directory: Path | str, model, vocab: Vocab, training: dict[str, Any] | None = None,
         optimizer: torch.optim.Optimizer | dict | None = None) -> None:
    """Replace the checkpoint in `directory` with `model` (and the optimizer or its state dict), as one unit."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        recover(directory)
        files = serialize(model, vocab, training, optimizer)
        commit(directory, files)
    except OSError as e:
        raise CheckpointError(
            f"cannot write the checkpoint in {directory} ({e.strerror or e}); free some space or make the "
            "folder writable (the previous checkpoint, if any, is intact)"
        ) from None


def serialize(model, vocab: Vocab, training: dict[str, Any] | None, optimizer) -> dict[str, bytes]:
    """The checkpoint's files as bytes: weights, optimizer state (when given), and the config recording their digests."""
    files = {WEIGHTS: save_safetensors(finite_weights(model), metadata={"format": "lmn-checkpoint"})}
    if optimizer is not None:
        state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        state = on_cpu(state)  # loadable without the device it trained on
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files[OPTIMIZER] = buffer.getvalue()
    meta = {"model": model.config.to_dict(), **vocab_fields(vocab), "training": training or {},
            DIGESTS: {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    try:
        files[CONFIG] = (json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except ValueError as e:
        raise CheckpointError(f"the training facts hold a non-finite number ({e}); record finite values only") from None
    return files


COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to every state_dict key


def plain_key(name: str) -> str:
    """A state_dict key without the segments torch.compile's wrapper adds (`_orig_mod.` at any depth)."""
    return name.replace(COMPILED_PREFIX, "")


def finite_weights(model) -> dict[str, torch.Tensor]:
    """The model's tensors by name, on the cpu and contiguous, keyed as the plain (uncompiled) module
    keys them, so a checkpoint written on any device by a compiled run loads anywhere; refuses NaN or
    infinite weights."""
    tensors = {plain_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"refusing to save non-finite weights ({name}); the previous checkpoint is kept")
    return tensors


def on_cpu(value: Any) -> Any:
    """`value` (nested dicts, lists, tuples of tensors) with every tensor moved to the cpu."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def commit(directory: Path, files: dict[str, bytes]) -> None:
    """Stage `files` in a private folder, commit it by one rename, then move its files into place."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    with locked(staging):
        try:
            for name, data in files.items():
                write_atomic(staging / name, data)
                keep_mode(staging / name, directory / name)
            fsync_directory(staging)
            os.rename(staging, directory / COMMIT)  # the commit point
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            fsync_directory(directory)
            roll_forward(directory)
        except BaseException:  # a signal after the commit point: finish the moves before stopping
            roll_forward(directory)
            raise


def keep_mode(staged: Path, target: Path) -> None:
    """Give a staged file the permission bits of the file it will replace, as write_atomic would."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(staged, stat.S_IMODE(target.stat().st_mode))


def roll_forward(directory: Path) -> None:
    """Finish a committed checkpoint: move the commit folder's files over the old ones, then remove it."""
    commit_folder = directory / COMMIT
    for name in UNIT:
        with contextlib.suppress(FileNotFoundError):  # moved already, or not part of this checkpoint
            os.replace(commit_folder / name, directory / name)
    fsync_directory(directory)
    shutil.rmtree(commit_folder, ignore_errors=True)
    fsync_directory(directory)


@contextlib.contextmanager
def locked(folder: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `folder` while inside; the lock dies with its holder.

    Yields False (holding nothing) when `wait` is off and another process holds the lock.
    """
    if fcntl is None:
        yield True
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def recover(directory: Path | str) -> None:
    """Leave `directory` with one whole checkpoint after an interrupted write (no-op, no writes, when there was none).

    Finishes a committed write and removes staging folders whose writer is gone.
    """
    directory = Path(directory)
    try:
        if (directory / COMMIT).is_dir():
            with contextlib.suppress(FileNotFoundError), locked(directory / COMMIT):  # waits for a live writer
                roll_forward(directory)
        for staging in directory.glob(STAGING_PREFIX + "*"):
            remove_if_abandoned(staging)
    except OSError as e:
        raise CheckpointError(
            f"{directory} holds an interrupted checkpoint write that cannot be finished ({e.strerror or e}); "
            "make the folder writable and run again"
        ) from None


def remove_if_abandoned(staging: Path) -> None:
    """Delete a staging folder unless a live writer still holds it."""
    with contextlib.suppress(FileNotFoundError), locked(staging, wait=False) as free:
        if free:
            shutil.rmtree(staging, ignore_errors=True)


def read_meta(directory: Path | str) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder (recovered first)."""
    recover(directory)
    path = Path(directory) / CONFIG
    if not path.exists():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG} is missing (train one with lmn-train)")
    meta = reader.read_json(path, CheckpointError, MAX_CONFIG_BYTES, "re-train or restore the checkpoint",
                            what="checkpoint config.json")
    if not isinstance(meta, dict) or "model" not in meta or not isinstance(meta.get(DIGESTS, {}), dict):
        raise CheckpointError(f"{path} is corrupt (no 'model', or '{DIGESTS}' is not a mapping); "
                              "re-train or restore the checkpoint")
    return meta


def matches_digest(meta: dict[str, Any], name: str, data: bytes) -> bool:
    """Whether `data` is the file `name` that config.json recorded (True when it recorded none)."""
    recorded = meta.get(DIGESTS, {}).get(name)
    return recorded is None or recorded == hashlib.sha256(data).hexdigest()


def read_weights(directory: Path) -> tuple[dict[str, Any], bytes]:
    """config.json and the weights bytes it records, checked against their digest.

    A mismatch is retried once: a reader can catch a writer between moving the weights and the config.
    """
    weights = directory / WEIGHTS
    for _ in range(2):
        meta = read_meta(directory)
        if not weights.exists():
            raise CheckpointError(f"{directory} has no {WEIGHTS}; re-train or restore the checkpoint")
        data = reader.read_bytes(weights, CheckpointError, MAX_WEIGHTS_BYTES, what="checkpoint model.safetensors")
        if matches_digest(meta, WEIGHTS, data):
            return meta, data
    raise CheckpointError(f"{weights} is corrupt (its sha256 differs from {CONFIG}'s); re-train or restore the checkpoint")


def load(directory: Path | str | None = None):
    """(model in eval mode, vocab, meta) from a checkpoint folder; the shipped default when None."""
    directory = Path(directory) if directory is not None else DEFAULT_CHECKPOINT
    meta, data = read_weights(directory)
    try:
        cfg = config_from_dict(meta["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG} has an unusable model config: {e}") from None
    try:
        vocab = vocab_from_fields(meta)
    except DataError as e:
        raise CheckpointError(f"{directory / CONFIG} has an unusable vocabulary: {e}; re-train or restore the checkpoint") from None
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(f"{directory / CONFIG}: vocabulary has {len(vocab)} tokens, config says {cfg.vocab_size}")
    weights = directory / WEIGHTS
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt ({e}); re-train or restore the checkpoint") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{weights} does not match its config.json ({first})") from None
    return model.eval(), vocab, meta


def load_optimizer_state(directory: Path | str, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The optimizer state saved with the checkpoint `meta` describes, checked; None when it saved none."""
    if OPTIMIZER not in meta.get(DIGESTS, {}):
        return None
    path = Path(directory) / OPTIMIZER
    advice = "restore the checkpoint folder, or start a fresh run in another --out"
    if not path.exists():
        raise CheckpointError(f"{path} is missing but {CONFIG} records it; {advice}")
    data = reader.read_bytes(path, CheckpointError, 2 * MAX_WEIGHTS_BYTES, what="checkpoint optimizer.pt")
    if not matches_digest(meta, OPTIMIZER, data):
        raise CheckpointError(f"{path} is corrupt (its sha256 differs from {CONFIG}'s); {advice}")
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is unreadable ({first}); {advice}") from None


def sha256(directory: Path | str) -> str:
    """Digest of a checkpoint's weights and config, to tie exports to their source."""
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()
