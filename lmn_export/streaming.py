"""The one loop that streams tokens through an exported graph, each step fed the state the last returned.

Every gate that runs a graph token by token (parity with PyTorch, quantization judging, Core ML
compression judging) streams through `stream_steps`, so they all feed a graph the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .graphs import BATCH, GraphSpec


def zero_state(spec: GraphSpec, start: list[int]) -> dict[str, np.ndarray]:
    """The empty state of len(start) rows, row b at pointer start[b]: zero memory (or cache), in the graph's dtypes."""
    inputs = {t.name: t for t in spec.inputs}
    state = {s.input: np.zeros([len(start) if d == BATCH else d for d in inputs[s.input].shape], inputs[s.input].dtype)
             for s in spec.state}
    state["pointer"] = np.asarray(start, dtype=inputs["pointer"].dtype)
    return state


def stream_steps(predictor, spec: GraphSpec, tokens: np.ndarray,
                 state: dict[str, np.ndarray]) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Feed tokens (B, T) one column per step from `state`; yields each step's outputs by name and the state after it."""
    token = next(t for t in spec.inputs if t.role == "token")
    for t in range(tokens.shape[1]):
        got = predictor.predict({token.name: tokens[:, t].astype(token.dtype), **state})
        state = {s.input: got[s.output] for s in spec.state}
        yield got, state


def stream_state(predictor, spec: GraphSpec, ids: list[int], start: int = 0,
                 state: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits (T, V) of one row fed `ids` from `state` (default: the empty state at pointer `start`), and the
    state after them."""
    state = zero_state(spec, [start]) if state is None else state
    logits = []
    for got, state in stream_steps(predictor, spec, np.asarray(ids, dtype=np.int64).reshape(1, -1), state):
        logits.append(np.asarray(got["logits"], dtype=np.float32)[0])
    return (np.stack(logits) if logits else np.zeros((0, 0), np.float32)), state


def stream_logits(predictor, spec: GraphSpec, ids: list[int], start: int = 0,
                  state: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Logits (T, V) of one row fed `ids` from `state` (default: the empty state at pointer `start`)."""
    return stream_state(predictor, spec, ids, start, state)[0]
