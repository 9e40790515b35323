"""Text <-> token ids: a character vocabulary (a token is a character) or the byte vocabulary (a
token is a UTF-8 byte), with an explicit policy for characters the model does not know, and the
streaming decoders that turn generated tokens back into whole characters."""

from __future__ import annotations

import codecs

UNKNOWN_POLICIES = ("error", "skip")
VOCAB_KINDS = ("chars", "bytes")
MAX_PENDING = 3  # a UTF-8 character is at most 4 bytes: at most 3 can wait for the rest


class UnknownCharacterError(ValueError):
    """Text with characters outside the model's vocabulary (policy "error")."""


def check_policy(unknown) -> None:
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}")


class CharDecoder:
    """Token ids -> characters for a character vocabulary: every token is a whole character."""

    pending = b""

    def __init__(self, chars: str):
        self.chars = chars

    def decode(self, token: int) -> str:
        return self.chars[token]

    def skip(self, ids) -> None:
        """Account for tokens that were fed, not generated (nothing to hold for characters)."""


class ByteDecoder:
    """UTF-8 byte tokens -> whole characters: the leading bytes of a character are held (`pending`,
    at most 3) until it is complete; an invalid sequence decodes to U+FFFD and never raises."""

    def __init__(self, pending: bytes = b""):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoder.setstate((pending, 0))

    @property
    def pending(self) -> bytes:
        """Bytes of a character not yet complete."""
        return self._decoder.getstate()[0]

    def decode(self, token: int) -> str:
        """The characters this byte completes: "" while a character is incomplete, else one or two
        (a U+FFFD for a broken sequence before the character this byte starts or is)."""
        return self._decoder.decode(bytes((token,)))

    def skip(self, ids) -> None:
        """Run fed tokens through, so that generation continues from the bytes the model has seen."""
        self._decoder.decode(bytes(ids))


class Vocab:
    """A character vocabulary: the token id of a character is its index in `chars`."""

    kind = "chars"

    def __init__(self, chars: str, unknown: str = "error"):
        check_policy(unknown)
        self.chars = chars
        self.unknown = unknown
        self.index = {c: i for i, c in enumerate(chars)}

    check_policy = staticmethod(check_policy)

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

    def decoder(self, pending: bytes = b"") -> CharDecoder:
        """A streaming decoder; `pending` must be empty (a character vocabulary never holds bytes)."""
        if pending:
            raise ValueError(f"a character vocabulary holds no pending bytes, got {pending!r}")
        return CharDecoder(self.chars)


class ByteVocab:
    """The byte vocabulary: the token ids of a text are its UTF-8 bytes (256 ids), so every
    character is known; a character of n bytes is n tokens."""

    kind = "bytes"

    def __init__(self, unknown: str = "error"):
        check_policy(unknown)
        self.unknown = unknown

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`. A lone surrogate (a str that is not text) raises, or is dropped with unknown="skip"."""
        try:
            return list(text.encode("utf-8", errors="ignore" if self.unknown == "skip" else "strict"))
        except UnicodeEncodeError as e:
            raise UnknownCharacterError(f"{text[e.start:e.end]!r} at {e.start} is not a character and has no UTF-8 "
                                        "bytes (use unknown='skip' to drop it)") from None

    def decode(self, ids) -> str:
        """Text of whole byte tokens; a broken sequence becomes U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")

    def decoder(self, pending: bytes = b"") -> ByteDecoder:
        """A streaming decoder holding `pending`, the start of a character (checked: at most 3 bytes
        that begin a valid UTF-8 character)."""
        probe = codecs.getincrementaldecoder("utf-8")()
        try:
            valid = len(pending) <= MAX_PENDING and probe.decode(pending) == "" and probe.getstate()[0] == pending
        except UnicodeDecodeError:
            valid = False
        if not valid:
            raise ValueError(f"pending bytes {pending.hex() or 'none'} are not the start of a UTF-8 character")
        return ByteDecoder(pending)


def make_vocab(kind: str, chars: str | None, unknown: str = "error") -> Vocab | ByteVocab:
    """The vocabulary a manifest describes (`vocabulary.kind`, and `vocabulary.tokens` for characters)."""
    if kind == "bytes":
        return ByteVocab(unknown)
    return Vocab(chars, unknown)
