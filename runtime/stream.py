"""One conversation's stream: feed text, generate characters, save and restore its state.

With a byte vocabulary a token is one UTF-8 byte: text is fed byte by byte, and `generate` yields
only whole characters (a character's leading bytes wait in the stream's decoder until it is
complete, across `generate` calls and in saved states; a broken sequence yields U+FFFD).
"""

from __future__ import annotations

import numbers
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .model import ExportedModel
from .reader import excerpt
from .sampling import check_sampling, sample
from .state_file import MAX_TOKENS_SEEN, StateFileError, load_state, max_file_bytes, save_state

PREFILL_MIN_TOKENS = 16  # what lmn-export writes as lmn.json prefill.min_prompt_tokens: shorter chunks are stepped


class ContextFullError(RuntimeError):
    """A stream that cannot take another token: a GPT export's KV cache is full, or an LMN stream is at
    the largest pointer its export supports (lmn.json `pointer.max`)."""


def check_stop(stop) -> tuple[str, ...]:
    """Stop strings as a tuple: one string is one stop string (never split into characters)."""
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a sequence of strings, got {stop!r}")
    return tuple(s for s in stop if s)


class Stream:
    """The state of one stream of tokens over a shared ExportedModel (not itself thread-safe:
    use one Stream per thread; many Streams may share a model across threads)."""

    def __init__(self, model: ExportedModel, pointer: int = 0):
        """A stream with the initial state (lmn.json `state`) at `pointer` (0: the empty stream; p: as if
        p tokens had passed and been forgotten, lmn.json `state.start_at_pointer`)."""
        if isinstance(pointer, bool) or not isinstance(pointer, numbers.Integral) or not 0 <= pointer <= model.pointer_max:
            raise ValueError(f"pointer must be a whole number in [0, {model.pointer_max}] (the pointer_max of its graphs in lmn.json), "
                             f"got {pointer!r}")
        if pointer and model.config.get("arch") != "lmn":
            raise ValueError("a GPT export's stream starts at pointer 0 (its KV cache holds every token it attends to)")
        self.model = model
        self.stepper = model.stepper()
        if pointer:
            name = model.pointer_input
            self.stepper.set_state({name: np.full_like(self.stepper.state[name], pointer)})
        self.start_pointer = int(pointer)
        self.prefill_calls: Counter[str] = Counter()
        self.tokens_seen = 0
        # (V,) float32 scores for the next token: None until the first token is fed or generated, then the output
        # of the last one (a prefill: its last position); a live view, replaced by each step: copy it to keep it
        self.logits: np.ndarray | None = None
        self.decode_seconds = 0.0
        self.decoded_tokens = 0
        self.decoder = model.vocab.decoder()  # holds the start of a character split across tokens (bytes)

    @property
    def state_bytes(self) -> int:
        """Bytes of this stream's state: constant, whatever its length."""
        return sum(a.nbytes for a in self.stepper.state.values())

    @property
    def graph_calls(self) -> Counter[str]:
        """How many calls each graph served in this stream (steps and prefills), by file (`file#function` for a
        function of a Core ML package): which graph ran."""
        return self.stepper.calls + self.prefill_calls

    @property
    def capacity(self) -> int | None:
        """Tokens this stream can hold: None (unbounded) for an LMN, the KV cache's rows for a GPT export."""
        return self.model.config.get("block_size") if self.model.config.get("arch") == "gpt" else None

    def reset(self) -> None:
        """Back to the initial state at the pointer this stream started at."""
        self.__init__(self.model, self.start_pointer)

    def _check_room(self, count: int) -> None:
        """`count` more tokens fit: the last of them steps from a pointer <= the graphs' `pointer_max`."""
        pointer = self.stepper.pointer
        if pointer + count - 1 <= self.model.pointer_max:
            return
        capacity = self.capacity
        if capacity is not None:
            raise ContextFullError(
                f"this export holds at most {capacity} tokens (a {capacity}-row KV cache) and the stream has "
                f"{self.tokens_seen}; {count} more do not fit: reset the stream (/reset in lmn-chat)")
        raise ContextFullError(
            f"the stream is at pointer {pointer} and this export supports pointers up to {self.model.pointer_max} "
            f"(pointer_max in lmn.json); {count} more tokens do not fit: reset the stream")

    def feed_ids(self, ids: Sequence[int]) -> None:
        """Feed token ids (ints in [0, vocab size)); on an error nothing is fed."""
        ids = list(ids)
        vocab_size = len(self.model.vocab)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"token ids out of range: they must be whole numbers in [0, {vocab_size}); got {bad[:5]}")
        ids = [int(i) for i in ids]
        self._check_room(len(ids))
        shortest = self.model.manifest.data["prefill"]["min_prompt_tokens"] if self.model.max_prefill else None
        while shortest is not None and len(ids) >= shortest:  # in pieces of at most the largest prefill graph
            used, logits, state, graph = self.model.prefill(ids, self.stepper.state)
            self.stepper.set_state(state)
            self.prefill_calls[graph] += 1
            self.logits = np.array(logits)
            self.tokens_seen += used
            self.decoder.skip(ids[:used])
            ids = ids[used:]
        for i in ids:
            self.logits = self.stepper.step(i)
            self.tokens_seen += 1
            self.decoder.skip((i,))

    def feed(self, text: str) -> None:
        """Feed text (prefill graphs for a long enough chunk, at any point of the stream; single steps otherwise)."""
        self.feed_ids(self.model.vocab.encode(text))

    def generate(self, max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] | str = ()) -> Iterator[str]:
        """Generate up to `max_tokens` tokens, each fed back, yielding characters as they complete.

        With a character vocabulary each token is one character. With the byte vocabulary a token
        is a byte: a character is yielded once all its bytes are out (a character cut off by
        `max_tokens` waits for the next call), and a broken sequence yields U+FFFD, never raises.
        Stops early after a `stop` string, matched on the yielded text (it is yielded; a plain string
        is one stop string). Temperature 0 is greedy. Arguments are checked here, before anything is
        fed; each token costs the same time and memory however long the call runs.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
        check_sampling(temperature, top_k, top_p, seed)
        return self._generate(int(max_tokens), temperature, top_k, top_p, seed, check_stop(stop))

    def _generate(self, max_tokens, temperature, top_k, top_p, seed, stop) -> Iterator[str]:
        if max_tokens == 0:
            return
        if self.logits is None:
            self.feed_ids(self.model.start_ids)
        rng = np.random.default_rng(seed)
        keep = max((len(s) for s in stop), default=0)
        tail = ""  # the last `keep` characters: all a stop string can end in
        for _ in range(max_tokens):
            self._check_room(1)
            token = sample(self.logits, rng, temperature, top_k, top_p)
            began = time.perf_counter()
            self.logits = self.stepper.step(token)
            self.decode_seconds += time.perf_counter() - began
            self.decoded_tokens += 1
            self.tokens_seen += 1
            stopped = False
            for char in self.decoder.decode(token):  # "" mid-character, 2 after a broken one; <= 3 bytes wait
                yield char
                if keep:
                    tail = (tail + char)[-keep:]
                    stopped = stopped or any(tail.endswith(s) for s in stop)
            if stopped:  # after the whole token: its characters are all in the model's state
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
        return save_state(path, arrays, {**self._identity(), "tokens_seen": self.tokens_seen,
                                         "pending_bytes": self.decoder.pending.hex()})

    def load(self, path: Path | str) -> None:
        """Replace this stream's state with a saved one; on any error nothing changes."""
        room = self.state_bytes + 4 * len(self.model.vocab)  # the state arrays, then (V,) float32 logits
        arrays, header = load_state(path, self._identity(), max_file_bytes(room))
        current = self.stepper.state
        for name, value in current.items():
            if name not in arrays or arrays[name].shape != value.shape or arrays[name].dtype != value.dtype:
                raise StateFileError(f"{path} does not hold a {name} of shape {value.shape} {value.dtype}")
        tokens_seen = header.get("tokens_seen")
        if isinstance(tokens_seen, bool) or not isinstance(tokens_seen, int) or not 0 <= tokens_seen <= MAX_TOKENS_SEEN:
            raise StateFileError(f"{path} has tokens_seen {excerpt(tokens_seen)}, not a count in [0, 2^53); "
                                 "nothing was loaded")
        logits = arrays.get("logits")
        vocab_size = len(self.model.vocab)
        if logits is not None and (logits.shape != (vocab_size,) or logits.dtype != np.float32):
            raise StateFileError(f"{path} holds logits of shape {logits.shape} {logits.dtype}, expected "
                                 f"({vocab_size},) float32; nothing was loaded")
        for name, value in arrays.items():
            if (value.dtype.kind == "f" and not np.isfinite(value).all()) or (value.dtype.kind == "i" and (value < 0).any()):
                raise StateFileError(f"{path} holds {'non-finite' if value.dtype.kind == 'f' else 'negative'} "
                                     f"values in {name}; nothing was loaded")
        if int(arrays[self.model.pointer_input][0]) > self.model.pointer_max:
            raise StateFileError(f"{path} holds pointer {int(arrays[self.model.pointer_input][0])}, past this export's "
                                 f"pointer.max {self.model.pointer_max}; nothing was loaded")
        if set(arrays) - set(current) - {"logits"}:
            raise StateFileError(f"{path} holds arrays this model has no use for: {excerpt(sorted(set(arrays) - set(current)))}")
        if (logits is None) != (tokens_seen == 0):
            raise StateFileError(f"{path} is inconsistent (tokens_seen {tokens_seen} with"
                                 f"{'out' if logits is None else ''} logits); nothing was loaded")
        pending = header.get("pending_bytes", "")  # absent in files saved before byte vocabularies
        try:
            if not isinstance(pending, str) or len(bytes.fromhex(pending)) > tokens_seen:
                raise ValueError(f"{excerpt(pending)} is not the hex of at most tokens_seen bytes")
            decoder = self.model.vocab.decoder(bytes.fromhex(pending))
        except ValueError as e:
            raise StateFileError(f"{path} has unusable pending_bytes ({e}); nothing was loaded") from None
        logits = arrays.pop("logits", None)
        self.stepper.set_state(arrays)
        self.logits = logits
        self.tokens_seen = tokens_seen
        self.decoder = decoder
