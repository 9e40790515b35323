"""Checkpoints: `model.safetensors` beside `config.json` (model config, vocabulary, training facts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import build_model
from .config import ConfigError, config_from_dict
from .data import CharVocab

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DEFAULT_CHECKPOINT = Path(__file__).parent / "default"


class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded; the message says what to do."""


def save(directory: Path | str, model, vocab: CharVocab, training: dict[str, Any] | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "lmn-checkpoint"})
    meta = {"model": model.config.to_dict(), "vocab": "".join(vocab.chars), "training": training or {}}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_meta(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG} is missing (train one with lmn-train)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["model"], meta["vocab"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-train or restore the checkpoint") from None
    return meta


def load(directory: Path | str | None = None):
    """(model in eval mode, vocab, meta) from a checkpoint folder; the shipped default when None."""
    directory = Path(directory) if directory is not None else DEFAULT_CHECKPOINT
    meta = read_meta(directory)
    try:
        cfg = config_from_dict(meta["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG} has an unusable model config: {e}") from None
    vocab = CharVocab(tuple(meta["vocab"]))
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(f"{directory / CONFIG}: vocabulary has {len(vocab)} characters, config says {cfg.vocab_size}")
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}; re-train or restore the checkpoint")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt ({e}); re-train or restore the checkpoint") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{weights} does not match its config.json ({first})") from None
    return model.eval(), vocab, meta


def sha256(directory: Path | str) -> str:
    """Digest of a checkpoint's weights and config, to tie exports to their source."""
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()
