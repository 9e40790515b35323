"""Parity of an exported graph with the PyTorch source: names, then shapes and dtypes, then values.

A stream of tokens runs through the model's own step (in PyTorch) and through the exported
graph, each fed its own state back; the report gives the max abs difference per output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from models import LMN, GPT, GPTConfig
from .graphs import BATCH, GraphSpec, example_state, step_graph
from .streaming import stream_steps

# fp32: the graph runs the same ops in another library; observed gaps are ~1e-6 over 512 tokens.
FP32_ATOL = 1e-4
# fp16 compute (Core ML --precision fp16): 10-bit mantissa, errors compound through 4 layers and
# the recurrent memory; observed logit gaps are ~1e-2 over 512 tokens on the shipped model.
FP16_ATOL = 0.1
START_POINTERS = (0, 2**24 - 100, 2**31 - 2**10)


class ValidationError(Exception):
    """An exported graph that does not compute what the PyTorch source computes."""


class NameMismatchError(ValidationError):
    pass


class ShapeError(ValidationError):
    pass


class AtolError(ValidationError):
    pass


@dataclass
class OutputDiff:
    name: str
    max_abs_diff: float
    atol: float

    @property
    def passed(self) -> bool:
        """Within tolerance; NaN or inf anywhere (a gap that is not a finite number) always fails."""
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol


@dataclass
class ParityReport:
    graph: str
    runner: str
    tokens: int
    batch: int
    start_pointers: list[int]
    outputs: list[OutputDiff] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        """Standard JSON: a non-finite gap (NaN or inf in an output) is written as null."""
        return {**asdict(self), "passed": self.passed,
                "start_pointers": [str(p) for p in self.start_pointers],  # decimal strings: exact beyond 2^53 in any parser
                "outputs": [{**asdict(o), "max_abs_diff": o.max_abs_diff if math.isfinite(o.max_abs_diff) else None,
                             "passed": o.passed} for o in self.outputs]}

    def raise_for_failure(self) -> None:
        failed = [f"{o.name} {o.max_abs_diff:.3g} > {o.atol:g}" for o in self.outputs if not o.passed]
        if failed:
            raise AtolError(f"{self.graph} ({self.runner}) differs from PyTorch: " + ", ".join(failed))


def check_names(spec: GraphSpec, input_names, output_names) -> None:
    for kind, want, got in (("inputs", [t.name for t in spec.inputs], list(input_names)),
                            ("outputs", [t.name for t in spec.outputs], list(output_names))):
        if sorted(want) != sorted(got):
            raise NameMismatchError(f"graph {kind} are {got}, expected {want}")


def check_shapes(spec: GraphSpec, outputs: dict[str, np.ndarray], batch: int) -> None:
    for t in spec.outputs:
        want = tuple(batch if d == BATCH else d for d in t.shape)
        got = outputs[t.name]
        if got.shape != want:
            raise ShapeError(f"output {t.name} has shape {got.shape}, expected {want}")
        if got.dtype != np.dtype(t.dtype):
            raise ShapeError(f"output {t.name} has dtype {got.dtype}, expected {t.dtype}")


def _initial_state(model: LMN | GPT, start: list[int]) -> tuple[torch.Tensor, ...]:
    *tensors, pointer = example_state(model, len(start))
    return (*tensors, torch.tensor(start, dtype=torch.int64))


def worst_gap(previous: float, got: np.ndarray, want: np.ndarray) -> float:
    """The larger of `previous` and max |got - want|; NaN or inf in either array gives inf, so it sticks."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise ShapeError(f"shape {got.shape}, expected {want.shape}")
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return math.inf
    return max(previous, float(np.abs(got - want).max(initial=0.0)))


@torch.no_grad()
def stream_parity(model: LMN | GPT, predictor, spec: GraphSpec, tokens: np.ndarray, start: list[int],
                  atol: float, graph: str, runner: str) -> ParityReport:
    """Stream tokens (B, T) through `predictor` and the model's step from pointers `start`."""
    reference = step_graph(model)
    dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
    state_names = [t.name for t in spec.inputs[1:]]
    torch_state = _initial_state(model, start)
    graph_state = {n: t.numpy().astype(dtypes[n]) for n, t in zip(state_names, torch_state)}
    diffs = {t.name: 0.0 for t in spec.outputs}
    batch, steps = tokens.shape
    for t, (got, _) in enumerate(stream_steps(predictor, spec, tokens, graph_state)):
        want = reference(torch.from_numpy(tokens[:, t].astype(np.int64)), *torch_state)
        if t == 0:
            check_shapes(spec, got, batch)
        for out, ref in zip(spec.outputs, want):
            diffs[out.name] = worst_gap(diffs[out.name], got[out.name], ref.numpy())
        torch_state = want[1:]
    report = ParityReport(graph, runner, steps, batch, list(start),
                          [OutputDiff(name, gap, 0.0 if spec_dtype_is_int(spec, name) else atol)
                           for name, gap in diffs.items()])
    return report


def spec_dtype_is_int(spec: GraphSpec, name: str) -> bool:
    return any(t.name == name and t.dtype.startswith("int") for t in spec.outputs)


def stream_tokens(model: LMN | GPT, text_ids: list[int], steps: int, batch: int = 3) -> np.ndarray:
    """(batch, steps) token ids: row b reads the text from offset 7*b, wrapping around."""
    ids = np.asarray(text_ids, dtype=np.int64)
    if len(ids) == 0:
        raise ValidationError("parity text is empty")
    return np.stack([np.resize(np.roll(ids, -7 * b), steps) for b in range(batch)])


def start_pointers(model: LMN | GPT, steps: int, int_max: int = 2**63 - 1) -> list[int]:
    """Start positions of the parity rows. LMN: 0, across 2^24 and 2^31, and the last `steps` input
    pointers the graph supports (its last step reads pointer int_max - 1, so pointer + 1 still fits).
    GPT: within the cache."""
    if isinstance(model.config, GPTConfig):
        room = model.config.block_size - steps
        if room < 0:
            raise ValidationError(f"a {steps}-token parity stream does not fit a {model.config.block_size}-row KV cache")
        return [0, room // 2, room]
    starts = [p for p in START_POINTERS if p + steps < int_max] + [int_max - steps]
    return sorted(set(starts))


PREFILL_WARMUP = 37  # tokens stepped into a prefill parity row's starting state: odd, and past 2^5


def prefill_starts(model: LMN, size: int, int_max: int = 2**63 - 1) -> list[int]:
    """Start pointers of the prefill parity rows: the empty stream, unaligned, just below the top level's
    boundary (the next token re-summarizes every level), past 2^24 (float32 integers) and 2^31 (int32, for
    int64 graphs), and where a `size`-token prefill ends at the pointer's limit (`int_max`)."""
    top = 2 ** (model.config.max_levels - 1)
    starts = [0, PREFILL_WARMUP, max(top - 1, PREFILL_WARMUP + 1), 2**24 - 3, 2**31 - 2, int_max - size]
    return sorted({p for p in starts if p <= int_max - size})


@torch.no_grad()
def warm_state(model: LMN, tokens: np.ndarray, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's starting state at pointer starts[b]: the empty state there, or (pointer > 0) the state after
    stepping the row's first min(PREFILL_WARMUP, pointer) tokens (B, >= PREFILL_WARMUP) from pointer - that."""
    reference = step_graph(model)
    warm = [min(PREFILL_WARMUP, p) for p in starts]  # (B,)
    memory, _ = example_state(model, len(starts))
    pointer = torch.tensor([p - w for p, w in zip(starts, warm)], dtype=torch.int64)
    for t in range(max(warm, default=0)):
        _, stepped_memory, stepped_pointer = reference(torch.from_numpy(tokens[:, t]), memory, pointer)
        stepping = torch.tensor([t < w for w in warm])  # rows still warming up
        memory = torch.where(stepping.view(-1, 1, 1, 1), stepped_memory, memory)
        pointer = torch.where(stepping, stepped_pointer, pointer)
    return memory, pointer


@torch.no_grad()
def prefill_parity(model: LMN, predictor, spec: GraphSpec, tokens: np.ndarray, lengths: list[int], starts: list[int],
                   atol: float, graph: str, runner: str) -> ParityReport:
    """Prefill of each row's `lengths[b]` tokens from a state at pointer starts[b] vs as many PyTorch steps.

    tokens (B, >= PREFILL_WARMUP + size): each row's warm-up tokens (`warm_state`), then what is prefilled.
    The logits must match those of the last of those steps, and the state the state after it.
    """
    size = spec.inputs[0].shape[1]
    batch = tokens.shape[0]
    memory, pointer = warm_state(model, tokens, starts)
    padded = np.zeros((batch, size), dtype=np.int64)
    padded[:, : min(size, tokens.shape[1] - PREFILL_WARMUP)] = tokens[:, PREFILL_WARMUP : PREFILL_WARMUP + size]
    dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
    inputs = {"tokens": padded, "length": np.asarray(lengths), "memory": memory.numpy(), "pointer": pointer.numpy()}
    inputs = {name: value.astype(dtypes[name]) for name, value in inputs.items()}
    if spec.inputs[0].shape[0] == 1:  # a graph of batch 1 (Core ML): one row per call
        rows = [predictor.predict({name: value[b : b + 1] for name, value in inputs.items()}) for b in range(batch)]
        got = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
        check_shapes(spec, rows[0], 1)
    else:
        got = predictor.predict(inputs)
        check_shapes(spec, got, batch)
    reference = step_graph(model)
    state = (memory, pointer)
    want_logits = np.zeros_like(got["logits"])
    want_memory = np.zeros_like(got["memory_out"])
    for t in range(max(lengths)):
        logits, *state = reference(torch.from_numpy(padded[:, t]), *state)
        for b, n in enumerate(lengths):
            if n == t + 1:
                want_logits[b], want_memory[b] = logits[b].numpy(), state[0][b].numpy()
    want_pointer = np.asarray([p + n for p, n in zip(starts, lengths)], dtype=got["pointer_out"].dtype)
    return ParityReport(graph, runner, size, batch, list(starts), [
        OutputDiff("logits", worst_gap(0.0, got["logits"], want_logits), atol),
        OutputDiff("memory_out", worst_gap(0.0, got["memory_out"], want_memory), atol),
        OutputDiff("pointer_out", 0.0 if np.array_equal(got["pointer_out"], want_pointer) else math.inf, 0.0)])


def prefill_from_states(model: LMN, predictor, spec: GraphSpec, text_ids: list[int], atol: float, graph: str,
                        runner: str, int_max: int = 2**63 - 1) -> ParityReport:
    """`prefill_parity` of a `size`-token prefill graph from every state of `prefill_starts` (pointers below
    `int_max`), rows of lengths size, size/2 + 1 and 1 in turn, on the parity text."""
    size = spec.inputs[0].shape[1]
    starts = prefill_starts(model, size, int_max)
    tokens = stream_tokens(model, text_ids, PREFILL_WARMUP + size, len(starts))
    lengths = [(size, size // 2 + 1, 1)[b % 3] for b in range(len(starts))]
    return prefill_parity(model, predictor, spec, tokens, lengths, starts, atol, graph, runner)
