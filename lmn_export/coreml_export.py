"""Core ML export of the step and prefill graphs: mlprogram, int32 token and pointer; iOS 18 / macOS 15 (the
functions of one package, `coreml_package`) or, asked for, iOS 16 / macOS 13 (a package per graph).

The default keeps the state as explicit fp32 inputs and outputs. `stateful=True` writes an
iOS 18 variant whose memory is a Core ML `StateType` updated in place; Core ML requires such
state to be fp16, so that variant trades precision (and the explicit state a caller can save
or branch) for no state copy per token.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import LMN, GPT, LMNConfig, StepState
from .graphs import (BATCH, MEMORY_LAYOUT, POINTER_LAYOUT, GraphSpec, PrefillGraph, StateSpec, TensorSpec, example_state,
                     prefill_spec, state_tensor, step_graph, step_spec)
from .onnx_export import MAX_BATCH, ExportError

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16")
DEPLOYMENT = {"iOS16": "iOS16/macOS13", "iOS18": "iOS18/macOS15"}  # converter target -> lmn.json minimum_deployment_target


def _coremltools():
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        try:
            import coremltools as ct
        except ImportError as e:
            raise ExportError("Core ML export needs coremltools: pip install 'lmn[export]'") from e
    return ct


_NP_DTYPES = {"int32": np.int32, "float32": np.float32, "float16": np.float16}


def _tensor_types(ct, specs, batch_dim):
    return [
        ct.TensorType(t.name, shape=tuple(batch_dim if d == BATCH else d for d in t.shape), dtype=_NP_DTYPES[t.dtype])
        for t in specs
    ]


def _convert(ct, traced, spec: GraphSpec, precision: str, target):
    batch = ct.RangeDim(1, MAX_BATCH, default=1)
    compute = ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        try:
            return ct.convert(
                traced, inputs=_tensor_types(ct, spec.inputs, batch),
                outputs=[ct.TensorType(t.name, dtype=_NP_DTYPES[t.dtype]) for t in spec.outputs],
                convert_to="mlprogram", minimum_deployment_target=target, compute_precision=compute,
            )
        except Exception as e:
            raise ExportError(f"Core ML conversion failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e


def _trace(graph: nn.Module, args: tuple):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(graph, args, check_trace=False)


def coreml_spec(cfg) -> GraphSpec:
    """The step's I/O as Core ML sees it: int32 token and pointer (Core ML has no int64 I/O).

    An int32 pointer limits a Core ML stream to 2^31 - 2 tokens; the I/O stays fp32 at fp16 compute.
    """
    return step_spec(cfg, int_dtype="int32")


def convert_step(model: LMN | GPT, precision: str = "fp32", target: str = "iOS16"):
    """(mlmodel, spec): the step graph converted for `target` ("iOS16", or "iOS18" for the ops
    compressed weights need there), explicit state inputs and outputs."""
    ct = _coremltools()
    spec = coreml_spec(model.config)
    args = (torch.zeros(2, dtype=torch.int32), *(t.int() if t.dtype == torch.int64 else t for t in example_state(model, 2)))
    traced = _trace(step_graph(model, torch.int32), args)
    mlmodel = _convert(ct, traced, spec, precision, getattr(ct.target, target))
    mlmodel.short_description = f"{type(model).__name__} single-token step ({precision})"
    return mlmodel, spec


def export_step(model: LMN | GPT, path: Path, precision: str = "fp32", target: str = "iOS16") -> GraphSpec:
    """Write the step graph as an .mlpackage with explicit state inputs and outputs."""
    mlmodel, spec = convert_step(model, precision, target)
    mlmodel.save(str(path))
    return spec


class _Int32Prefill(nn.Module):
    """The prefill graph with int32 tokens, length and pointer (Core ML has no int64 I/O)."""

    def __init__(self, model: LMN):
        super().__init__()
        self.prefill = PrefillGraph(model)

    def forward(self, tokens: torch.Tensor, length: torch.Tensor, memory: torch.Tensor, pointer: torch.Tensor):
        logits, memory, pointer = self.prefill(tokens.long(), length.long(), memory, pointer.long())
        return logits, memory, pointer.int()


def coreml_prefill_spec(cfg: LMNConfig, size: int) -> GraphSpec:
    """The prefill's I/O as Core ML sees it: int32 tokens, length and pointer, batch 1 (one stream per call)."""
    spec = prefill_spec(cfg, size)

    def core_ml(t: TensorSpec) -> TensorSpec:
        shape = tuple(1 if d == BATCH else d for d in t.shape)
        return TensorSpec(t.name, shape, "int32" if t.dtype == "int64" else t.dtype, t.role, t.state)

    return GraphSpec(tuple(map(core_ml, spec.inputs)), tuple(map(core_ml, spec.outputs)), spec.state)


def export_prefill(model: LMN, path: Path, size: int, precision: str = "fp32", target: str = "iOS16") -> GraphSpec:
    """Write a prefill graph (`size` tokens from any state, batch 1) as an .mlpackage."""
    ct = _coremltools()
    spec = coreml_prefill_spec(model.config, size)
    memory, _ = example_state(model, 1)
    args = (torch.zeros(1, size, dtype=torch.int32), torch.tensor([size], dtype=torch.int32), memory,
            torch.tensor([2**30 + 5], dtype=torch.int32))
    traced = _trace(_Int32Prefill(model).eval(), args)
    mlmodel = _convert(ct, traced, spec, precision, getattr(ct.target, target))
    mlmodel.short_description = f"LMN prefill of up to {size} tokens from any state ({precision})"
    mlmodel.save(str(path))
    return spec


class _StatefulStep(nn.Module):
    """The LMN step with memory held in a registered buffer, which Core ML turns into a StateType."""

    def __init__(self, model: LMN):
        super().__init__()
        self.model = model
        cfg = model.config
        self.register_buffer("memory", torch.zeros(1, cfg.n_layer, cfg.n_slots, cfg.n_embd, dtype=torch.float16))

    def forward(self, token: torch.Tensor, pointer: torch.Tensor):
        logits, after = self.model.step(token.long(), StepState(self.memory.float(), pointer.long()))
        self.memory[:] = after.memory.half()
        return logits, after.pointer.int()


def stateful_spec(cfg: LMNConfig) -> GraphSpec:
    """The step's I/O with `memory` as an fp16 state of batch 1 (validation reads it back as memory_out)."""
    shape = (1, cfg.n_layer, cfg.n_slots, cfg.n_embd)
    return GraphSpec(
        inputs=(TensorSpec("token", (1,), "int32", "token"), state_tensor("memory", shape, "float16", "memory"),
                state_tensor("pointer", (1,), "int32", "pointer")),
        outputs=(TensorSpec("logits", (1, cfg.vocab_size), "float32", "logits"),
                 state_tensor("memory_out", shape, "float16", "memory"), state_tensor("pointer_out", (1,), "int32", "pointer")),
        state=(StateSpec("memory", "memory_out", MEMORY_LAYOUT + " (Core ML StateType, fp16)"),
               StateSpec("pointer", "pointer_out", POINTER_LAYOUT)),
    )


def export_stateful_step(model: LMN, path: Path) -> GraphSpec:
    """iOS 18 variant: memory is an fp16 Core ML state (batch 1), token and pointer are I/O."""
    if not isinstance(model, LMN):
        raise ExportError("--stateful is implemented for LMN models only")
    ct = _coremltools()
    cfg = model.config
    spec = stateful_spec(cfg)
    graph = _StatefulStep(model).eval()
    traced = _trace(graph, (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)))
    state = ct.StateType(wrapped_type=ct.TensorType(shape=(1, cfg.n_layer, cfg.n_slots, cfg.n_embd), dtype=np.float16),
                         name="memory")
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        try:
            mlmodel = ct.convert(
                traced, inputs=[ct.TensorType("token", shape=(1,), dtype=np.int32),
                                ct.TensorType("pointer", shape=(1,), dtype=np.int32)],
                outputs=[ct.TensorType("logits", dtype=np.float32), ct.TensorType("pointer_out")], states=[state],
                convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16,
            )
        except Exception as e:
            raise ExportError(f"stateful Core ML conversion failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    mlmodel.save(str(path))
    return spec
