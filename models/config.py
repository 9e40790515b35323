"""Model configs: the single source of every shape, saved as JSON beside the weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

SUMMARIZERS = ("linear", "conv", "dwsep")


class ConfigError(ValueError):
    """A config that cannot describe a valid model."""


@dataclass(frozen=True)
class LMNConfig:
    """A Logarithmic Memory Network language model.

    Memory layout (per layer): slot 0 is level 0 (the token itself); then for each level
    i = 1..max_levels-1 and each bank b, one summary node at slot 1 + (i-1)*n_bank + b.
    Attention reads every node, each summary node widened to 1 + expand slots by the expander.
    """

    arch: ClassVar[str] = "lmn"

    vocab_size: int = 65
    n_embd: int = 32
    n_head: int = 4
    n_layer: int = 4
    n_bank: int = 2
    max_levels: int = 10
    summarizer: str = "linear"
    ff_mult: int = 4
    expand: int = 0

    def __post_init__(self) -> None:
        positive = ("vocab_size", "n_embd", "n_head", "n_layer", "n_bank", "max_levels", "ff_mult")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.summarizer not in SUMMARIZERS:
            raise ConfigError(f"summarizer must be one of {SUMMARIZERS}, got {self.summarizer!r}")
        if not isinstance(self.expand, int) or self.expand < 0:
            raise ConfigError(f"expand must be a non-negative integer, got {self.expand!r}")
        if self.max_levels > 62:
            raise ConfigError("max_levels must be <= 62 so that 2**(max_levels-1) fits int64")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_slots(self) -> int:
        """Memory nodes kept per layer in the recurrent state."""
        return 1 + (self.max_levels - 1) * self.n_bank

    @property
    def n_attn_slots(self) -> int:
        """Slots the attention reads per layer (summary nodes widened by the expander)."""
        return 1 + (self.max_levels - 1) * self.n_bank * (1 + self.expand)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class GPTConfig:
    """A GPT-2-style causal transformer: learned positions, pre-LayerNorm, ReLU feed-forward."""

    arch: ClassVar[str] = "gpt"

    vocab_size: int = 65
    n_embd: int = 32
    n_head: int = 4
    n_layer: int = 4
    block_size: int = 512

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_embd", "n_head", "n_layer", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **dataclasses.asdict(self)}


ModelConfig = LMNConfig | GPTConfig
_ARCHS = {"lmn": LMNConfig, "gpt": GPTConfig}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a config from `to_dict()` output; unknown keys are an error, not ignored."""
    d = dict(d)
    arch = d.pop("arch", None)
    if arch not in _ARCHS:
        raise ConfigError(f"unknown model arch {arch!r}; expected one of {sorted(_ARCHS)}")
    cls = _ARCHS[arch]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown {arch} config keys: {sorted(unknown)}")
    return cls(**d)


# Presets. Parameter counts (vocab 65) match the paper's Table 1; see tests/models/test_presets.py.
# logmem-512 is not in the paper: the same family at 4x the width of logmem-128 (16.9M parameters,
# 67 MB of fp32 weights), for timing decode where weight bandwidth, not per-node cost, bounds a step.
PRESETS: dict[str, ModelConfig] = {
    "logmem-32": LMNConfig(n_embd=32, n_head=4, n_layer=4, n_bank=2, ff_mult=4),
    "logmem-128": LMNConfig(n_embd=128, n_head=4, n_layer=4, n_bank=2, ff_mult=4),
    "logmem-512": LMNConfig(n_embd=512, n_head=8, n_layer=4, n_bank=2, ff_mult=4),
    "expsum-32": LMNConfig(n_embd=32, n_head=4, n_layer=4, n_bank=1, ff_mult=4, expand=1),
    "tinylogmem-32": LMNConfig(n_embd=32, n_head=4, n_layer=4, n_bank=2, ff_mult=1),
    "gpt2-32": GPTConfig(n_embd=32, n_head=4, n_layer=4, block_size=512),
    "gpt2-128": GPTConfig(n_embd=128, n_head=4, n_layer=4, block_size=256),
}


def preset(name: str, vocab_size: int | None = None) -> ModelConfig:
    """A preset config, optionally with the vocabulary size of a given text."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, vocab_size=vocab_size) if vocab_size else cfg


def dumps(cfg: ModelConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
