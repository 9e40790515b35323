"""Prefill against stepping, per width: the break-even length (the shortest chunk that a prefill graph
feeds faster than single steps, from a stream's state) and the second turn (a long turn fed after a
long history: prefill from that state, the same turn as a first one, and stepping it)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import runtime
from runtime.backends import empty_state

from .decode_speed import export_preset
from .timing import cycle

# Goals of the second turn (issue: prefill from any state): at most this times the first turn's prefill
# of the same length, and at most this times stepping it.
SECOND_TURN_VS_FIRST_GOAL = 1.2
SECOND_TURN_VS_STEPPING_GOAL = 0.3


@dataclass
class PrefillSettings:
    history: int = 10_000  # tokens fed before the second turn
    turn: int = 4096  # tokens of the turn
    lengths: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)  # chunk lengths of the break-even search
    from_pointer: int = 1001  # the break-even chunks start here (an odd pointer, mid-stream)
    presets: tuple[str, ...] = ("logmem-128",)  # random-weight exports timed beside the export itself
    reps: int = 5  # repetitions, variants interleaved


def state_after(model: runtime.ExportedModel, ids: list[int]) -> dict[str, np.ndarray]:
    """The state of a stream fed `ids` (prefilled where the runtime chooses, as a user's stream)."""
    stream = runtime.Stream(model)
    stream.feed_ids(ids)
    return {k: np.array(v) for k, v in stream.stepper.state.items()}


def prefill_all(model: runtime.ExportedModel, state: dict, ids: list[int]) -> None:
    """Feed every id through prefill graphs from `state` (the largest graph, then the smallest that holds the rest)."""
    while ids:
        used, _, state, _ = model.prefill(ids, state)
        ids = ids[used:]


def step_all(model: runtime.ExportedModel, state: dict, ids: list[int]) -> None:
    """Feed every id as a single step from `state` (the fast paths where they apply)."""
    stepper = model.stepper()
    stepper.set_state(state)
    for i in ids:
        stepper.step(i)


def time_interleaved(variants: dict, reps: int) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, variants interleaved rep after rep (a slow phase hits all alike)."""
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            began = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - began) * 1e3)
    return times


def break_even(model: runtime.ExportedModel, drive: list[int], s: PrefillSettings) -> dict:
    """Per chunk length, prefill (the smallest graph holding it) vs stepping it from a mid-stream state;
    the break-even length is the shortest from which prefill is faster at every longer length measured."""
    state = state_after(model, cycle(drive, s.from_pointer))
    rows = []
    for n in s.lengths:
        ids = cycle(drive, n, s.from_pointer)
        times = time_interleaved({"prefill": lambda: prefill_all(model, state, ids),
                                  "stepping": lambda: step_all(model, state, ids)}, s.reps)
        prefill, stepping = statistics.median(times["prefill"]), statistics.median(times["stepping"])
        rows.append({"tokens": n, "graph_size": model.prefill_graph(n)["size"], "prefill_ms": prefill,
                     "stepping_ms": stepping, "ratio": prefill / stepping})
    faster = [row["ratio"] < 1 for row in rows]
    first = next((k for k in range(len(rows)) if all(faster[k:])), None)
    return {"from_pointer": s.from_pointer, "rows": rows,
            "break_even_tokens": rows[first]["tokens"] if first is not None else None}


def second_turn(model: runtime.ExportedModel, drive: list[int], s: PrefillSettings) -> dict:
    """A `turn`-token turn fed after `history` tokens: prefilled from that state, as a first turn, and stepped."""
    history = state_after(model, cycle(drive, s.history))
    empty = empty_state(model.step_graph)
    turn = cycle(drive, s.turn, s.history)
    times = time_interleaved({"first turn, prefill": lambda: prefill_all(model, empty, turn),
                              "second turn, prefill": lambda: prefill_all(model, history, turn),
                              "second turn, stepping": lambda: step_all(model, history, turn)}, s.reps)
    ms = {name: statistics.median(t) for name, t in times.items()}
    vs_first = ms["second turn, prefill"] / ms["first turn, prefill"]
    vs_stepping = ms["second turn, prefill"] / ms["second turn, stepping"]
    return {"history": s.history, "turn": s.turn, "ms_median": ms, "ms_all": times,
            "second_vs_first": vs_first, "second_vs_stepping": vs_stepping,
            "goals": {"second_vs_first": {"goal": SECOND_TURN_VS_FIRST_GOAL, "met": vs_first <= SECOND_TURN_VS_FIRST_GOAL},
                      "second_vs_stepping": {"goal": SECOND_TURN_VS_STEPPING_GOAL,
                                             "met": vs_stepping <= SECOND_TURN_VS_STEPPING_GOAL}}}


def bench_prefill(export_dir: Path, drive: list[int], s: PrefillSettings, threads: int, work: Path, log) -> list[dict]:
    """The export itself and each preset of `s.presets` (random weights, its own prefill graphs): break-even
    length and second turn per width."""
    model = runtime.load(export_dir, threads=threads)
    if not model.prefill_graphs:
        raise runtime.ManifestError(f"{export_dir} has no prefill graphs; the prefill section needs an export with them "
                                    "(lmn-export --prefill 64,512,4096)")
    sizes = tuple(g["size"] for g in model.prefill_graphs)
    targets = [("export", model)]
    for name in s.presets:
        folder = export_preset(name, work, len(model.vocab), ("fp32",), log, prefill_sizes=sizes)
        targets.append((f"{name} (random weights)", runtime.load(folder, threads=threads)))
    rows = []
    for label, target in targets:
        width = target.config["n_embd"]
        log(f"prefill vs stepping, {label} (width {width}): break-even length")
        even = break_even(target, drive, s)
        log(f"prefill vs stepping, {label}: a {s.turn:,}-token turn after {s.history:,} tokens")
        rows.append({"model": label, "n_embd": width, "prefill_sizes": list(sizes), "break_even": even,
                     "second_turn": second_turn(target, drive, s)})
    return rows
