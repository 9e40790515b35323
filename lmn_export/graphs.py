"""Thin wrappers that give the models' own `step` and parallel `forward` named graph I/O.

Nothing here re-implements model math: each wrapper calls the model and only renames, casts
integer dtypes for targets without int64 (Core ML), and flattens state dataclasses to tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models import GPT, LMN, GPTConfig, KVState, LMNConfig, StepState

BATCH = "batch"


ROLES = ("token", "tokens", "length", "logits", "state")  # what a graph input or output is for (lmn.json "role")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name, shape, dtype, role (ROLES) and, for role "state", the state tensor."""

    name: str
    shape: tuple  # ints, or BATCH / TIME for symbolic axes
    dtype: str  # numpy dtype name
    role: str
    state: str | None = None  # role "state": the name of the state tensor it carries (lmn.json "state.tensors")

    def to_dict(self) -> dict:
        entry = {"name": self.name, "role": self.role, "shape": list(self.shape), "dtype": self.dtype}
        return {**entry, "state": self.state} if self.state else entry


def state_tensor(name: str, shape: tuple, dtype: str, carries: str) -> TensorSpec:
    return TensorSpec(name, shape, dtype, "state", carries)


@dataclass(frozen=True)
class StateSpec:
    """A state tensor that a step reads as `input` and returns as `output`."""

    input: str
    output: str
    layout: str


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: tuple[StateSpec, ...] = ()

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "state": [{"tensor": s.input, "input": s.input, "output": s.output} for s in self.state],
        }

    @classmethod
    def from_dict(cls, entry: dict) -> "GraphSpec":
        """The I/O a manifest graph entry records (`to_dict`); state layouts are not recorded there."""
        def tensor(t: dict) -> TensorSpec:
            return TensorSpec(t["name"], tuple(t["shape"]), t["dtype"], t["role"], t.get("state"))

        return cls(tuple(map(tensor, entry["inputs"])), tuple(map(tensor, entry["outputs"])),
                   tuple(StateSpec(s["input"], s["output"], "") for s in entry["state"]))


MEMORY_LAYOUT = (
    "memory[b, layer, slot, :]: slot 0 is the last token's level-0 node (normed input); slot "
    "1 + (i-1)*n_bank + k is bank k's level-i summary of tokens [(m-1)*2^i, m*2^i - 1], "
    "m = floor(pointer/2^i); zeros while empty"
)
POINTER_LAYOUT = "pointer[b]: position of the next token of row b (tokens seen so far)"
KV_LAYOUT = "{name}[b, layer, head, row, :]: the {what} of the token at position row (rows >= pointer unused)"


def step_spec(cfg, int_dtype: str = "int64") -> GraphSpec:
    """I/O of the single-token step graph of an LMN (memory) or GPT (KV cache) config."""
    logits = TensorSpec("logits", (BATCH, cfg.vocab_size), "float32", "logits")
    token = TensorSpec("token", (BATCH,), int_dtype, "token")
    pointer = state_tensor("pointer", (BATCH,), int_dtype, "pointer")
    pointer_out = state_tensor("pointer_out", (BATCH,), int_dtype, "pointer")
    if isinstance(cfg, LMNConfig):
        memory_shape = (BATCH, cfg.n_layer, cfg.n_slots, cfg.n_embd)
        return GraphSpec(
            inputs=(token, state_tensor("memory", memory_shape, "float32", "memory"), pointer),
            outputs=(logits, state_tensor("memory_out", memory_shape, "float32", "memory"), pointer_out),
            state=(StateSpec("memory", "memory_out", MEMORY_LAYOUT), StateSpec("pointer", "pointer_out", POINTER_LAYOUT)),
        )
    cache_shape = (BATCH, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.head_dim)
    return GraphSpec(
        inputs=(token, state_tensor("keys", cache_shape, "float32", "keys"),
                state_tensor("values", cache_shape, "float32", "values"), pointer),
        outputs=(logits, state_tensor("keys_out", cache_shape, "float32", "keys"),
                 state_tensor("values_out", cache_shape, "float32", "values"), pointer_out),
        state=(StateSpec("keys", "keys_out", KV_LAYOUT.format(name="keys", what="key")),
               StateSpec("values", "values_out", KV_LAYOUT.format(name="values", what="value")),
               StateSpec("pointer", "pointer_out", POINTER_LAYOUT)),
    )


def prefill_spec(cfg: LMNConfig, size: int) -> GraphSpec:
    """I/O of a prefill graph: up to `size` tokens in parallel from any state (the step's memory and pointer).

    tokens (B, size) holds each row's next tokens left-aligned, padded with any valid id; length (B,)
    says how many are real (1..size). Outputs the logits at the last real token and the state after
    `length` tokens, which equals that of `length` steps from the same state; padding never leaks in
    (causality).
    """
    memory_shape = (BATCH, cfg.n_layer, cfg.n_slots, cfg.n_embd)
    return GraphSpec(
        inputs=(TensorSpec("tokens", (BATCH, size), "int64", "tokens"), TensorSpec("length", (BATCH,), "int64", "length"),
                state_tensor("memory", memory_shape, "float32", "memory"), state_tensor("pointer", (BATCH,), "int64", "pointer")),
        outputs=(TensorSpec("logits", (BATCH, cfg.vocab_size), "float32", "logits"),
                 state_tensor("memory_out", memory_shape, "float32", "memory"),
                 state_tensor("pointer_out", (BATCH,), "int64", "pointer")),
        state=(StateSpec("memory", "memory_out", MEMORY_LAYOUT), StateSpec("pointer", "pointer_out", POINTER_LAYOUT)),
    )


class StepGraph(nn.Module):
    """(token, memory, pointer) -> (logits, memory_out, pointer_out): the LMN's own `step`, named.

    levels=None: valid at any pointer. levels=k, full: a fast path valid only where `LMN.step`
    allows them (every row re-summarizes exactly k levels; every row's memory is full).
    """

    def __init__(self, model: LMN, int_dtype: torch.dtype = torch.int64, levels: int | None = None,
                 full: bool = False):
        super().__init__()
        self.model = model
        self.int_dtype = int_dtype
        self.levels, self.full = levels, full

    def forward(self, token: torch.Tensor, memory: torch.Tensor, pointer: torch.Tensor):
        logits, after = self.model.step(token.long(), StepState(memory, pointer.long()), self.levels, self.full)
        return logits, after.memory, after.pointer.to(self.int_dtype)


class KVStepGraph(StepGraph):
    """(token, keys, values, pointer) -> (logits, keys_out, values_out, pointer_out): GPT's `step`."""

    def forward(self, token: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pointer: torch.Tensor):
        logits, after = self.model.step(token.long(), KVState(keys, values, pointer.long()))
        return logits, after.keys, after.values, after.pointer.to(self.int_dtype)


def step_graph(model: LMN | GPT, int_dtype: torch.dtype = torch.int64, levels: int | None = None,
               full: bool = False) -> StepGraph:
    if isinstance(model, LMN):
        return StepGraph(model, int_dtype, levels, full).eval()
    return KVStepGraph(model, int_dtype).eval()


class PrefillGraph(nn.Module):
    """(tokens (B, P), length (B,), memory, pointer) -> logits at length-1 (B, V), memory_out, pointer_out:
    the LMN's own parallel `forward` from the given state, named."""

    def __init__(self, model: LMN):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, length: torch.Tensor, memory: torch.Tensor, pointer: torch.Tensor):
        logits, state = self.model(tokens, return_state=True, lengths=length, state=StepState(memory, pointer))
        last = (length - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
        return logits.gather(1, last).squeeze(1), state.memory, state.pointer


def example_state(model: LMN | GPT, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """A batch of empty states as a flat tuple, in graph input order (pointer last)."""
    state = model.init_state(batch)
    if isinstance(model.config, GPTConfig):
        return state.keys, state.values, state.pointer
    return state.memory, state.pointer


class KVRowsGraph(nn.Module):
    """Benchmark layout: (token, keys, values, pointer) -> (logits, key_rows, value_rows) (B, N, H, D).

    The caches are read only; the caller writes the rows at `pointer` into its preallocated
    cache in place, so no step copies the cache.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, token, keys, values, pointer):
        return self.model.step_layout(token, keys, values, pointer, "rows")


class KVConcatGraph(nn.Module):
    """Benchmark layout: (token, past_keys, past_values) -> (logits, present_keys, present_values)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, token, past_keys, past_values):
        pointer = torch.full_like(token, past_keys.shape[3])
        return self.model.step_layout(token, past_keys, past_values, pointer, "concat")
