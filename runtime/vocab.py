"""Characters <-> token ids, with an explicit policy for characters the model does not know."""

from __future__ import annotations

UNKNOWN_POLICIES = ("error", "skip")


class UnknownCharacterError(ValueError):
    """Text with characters outside the model's vocabulary (policy "error")."""


class Vocab:
    def __init__(self, chars: str, unknown: str = "error"):
        self.check_policy(unknown)
        self.chars = chars
        self.unknown = unknown
        self.index = {c: i for i, c in enumerate(chars)}

    @staticmethod
    def check_policy(unknown) -> None:
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}")

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Unknown characters raise (default) or are dropped (unknown="skip")."""
        missing = sorted({c for c in text if c not in self.index})
        if missing and self.unknown == "error":
            raise UnknownCharacterError(
                f"characters not in the model's vocabulary: {''.join(missing)!r} "
                f"(use unknown='skip' to drop them, or a model trained on text that has them)"
            )
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)
