"""One conversation's stream: feed text, generate characters, save and restore its state."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .model import ExportedModel
from .sampling import sample
from .state_file import StateFileError, load_state, save_state

PREFILL_MIN_TOKENS = 16  # shorter first prompts are simply stepped


class Stream:
    """The state of one stream of tokens over a shared ExportedModel (not itself thread-safe:
    use one Stream per thread; many Streams may share a model across threads)."""

    def __init__(self, model: ExportedModel):
        self.model = model
        self.stepper = model.stepper()
        self.tokens_seen = 0
        self.logits: np.ndarray | None = None  # after the last token fed or generated
        self.decode_seconds = 0.0
        self.decoded_tokens = 0

    @property
    def state_bytes(self) -> int:
        """Bytes of this stream's state: constant, whatever its length."""
        return sum(a.nbytes for a in self.stepper.state.values())

    def reset(self) -> None:
        self.__init__(self.model)

    def feed_ids(self, ids: Sequence[int]) -> None:
        ids = list(ids)
        vocab_size = len(self.model.vocab)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
        if self.tokens_seen == 0 and len(ids) >= PREFILL_MIN_TOKENS and self.model.max_prefill:
            used, logits, state = self.model.prefill(ids)
            self.stepper.set_state(state)
            self.logits = np.array(logits)
            self.tokens_seen = used
            ids = ids[used:]
        for i in ids:
            self.logits = self.stepper.step(i)
            self.tokens_seen += 1

    def feed(self, text: str) -> None:
        """Feed text (prefill graph for a long first prompt, single steps otherwise)."""
        self.feed_ids(self.model.vocab.encode(text))

    def generate(self, max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield up to `max_tokens` characters as they are produced; each is fed back.

        Stops early after a `stop` string (which is yielded). Temperature 0 is greedy.
        """
        if self.logits is None:
            start = "\n" if "\n" in self.model.vocab.index else self.model.vocab.chars[0]
            self.feed(start)
        rng = np.random.default_rng(seed)
        produced = ""
        for _ in range(max_tokens):
            token = sample(self.logits, rng, temperature, top_k, top_p)
            began = time.perf_counter()
            self.logits = self.stepper.step(token)
            self.decode_seconds += time.perf_counter() - began
            self.decoded_tokens += 1
            self.tokens_seen += 1
            char = self.model.vocab.chars[token]
            produced += char
            yield char
            if any(produced.endswith(s) for s in stop if s):
                return

    @property
    def tokens_per_second(self) -> float:
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def _identity(self) -> dict:
        return {"model": self.model.source_sha256, "backend_state": [s["input"] for s in self.model.step_graph["state"]]}

    def save(self, path: Path | str) -> int:
        """Write this stream's state to `path`; returns bytes written."""
        arrays = {k: np.array(v) for k, v in self.stepper.state.items()}
        if self.logits is not None:
            arrays["logits"] = np.array(self.logits, dtype=np.float32)
        return save_state(path, arrays, {**self._identity(), "tokens_seen": self.tokens_seen})

    def load(self, path: Path | str) -> None:
        """Replace this stream's state with a saved one; on any error nothing changes."""
        arrays, header = load_state(path, self._identity())
        current = self.stepper.state
        for name, value in current.items():
            if name not in arrays or arrays[name].shape != value.shape or arrays[name].dtype != value.dtype:
                raise StateFileError(f"{path} does not hold a {name} of shape {value.shape} {value.dtype}")
        logits = arrays.pop("logits", None)
        self.stepper.set_state(arrays)
        self.logits = logits
        self.tokens_seen = int(header["tokens_seen"])
