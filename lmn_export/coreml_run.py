"""Run a saved .mlpackage: `MLModel.predict` on macOS; elsewhere coremltools' MIL value inference.

On Linux Core ML cannot execute, so the saved package is loaded back into coremltools' MIL
program (`milproto.load`) and its ops are evaluated one by one with their own
`value_inference` (numpy). That proves the saved graph numerically, op by op as written.
The one op coremltools gives no value inference for (`silu`) is evaluated from its MIL
definition, x * sigmoid(x), in the op's declared dtype.
"""

from __future__ import annotations

import platform
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .coreml_export import _coremltools
from .onnx_export import ExportError

MACOS = "MLModel.predict (macOS)"
MIL = "coremltools MIL value inference (Linux)"

_REFERENCE_KERNELS = {
    "silu": lambda op: op.x.val / (1 + np.exp(-op.x.val)),
    "read_state": lambda op: op.input.val,
}


class MILProgram:
    """Evaluates the main function of a saved mlprogram on numpy inputs."""

    def __init__(self, path: Path | str):
        ct = _coremltools()
        from coremltools.converters.mil.frontend.milproto import load as milproto
        from coremltools.converters.mil.mil import types

        self._types = types
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        spec = mlmodel.get_spec()
        program = milproto.load(spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)
        self.function = program.functions["main"]
        self.ops = [op for op in self.function.operations if op.op_type != "const"]
        for op in self.function.operations:  # numpy wants Python bools for flags like keep_dims
            if op.op_type == "const" and isinstance(op.outputs[0].val, np.bool_):
                op.outputs[0]._sym_val = SimpleNamespace(val=bool(op.outputs[0].val))
        self.output_names = [v.name for v in self.function.outputs]

    def _assign(self, var, value) -> None:
        """Give a var a concrete value, cast to its declared dtype, and the value's shape."""
        types = self._types
        if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
            value = np.asarray(value).astype(types.nptype_from_builtin(var.dtype), copy=False)
        if types.is_tensor(var.sym_type):
            var._sym_type = types.tensor(var.dtype, value.shape)
        var._sym_val = SimpleNamespace(val=value)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; a state input `s` (StateType) is read from inputs and returned as `s_out`."""
        states = {}
        for name, var in self.function.inputs.items():
            if name not in inputs:
                raise ExportError(f"Core ML program needs input {name!r}")
            if self._types.is_state(var.sym_type):
                states[name] = np.asarray(inputs[name]).astype(self._types.nptype_from_builtin(var.dtype))
                var._sym_val = SimpleNamespace(val=states[name])
            else:
                self._assign(var, inputs[name])
        for op in self.ops:
            if op.op_type == "coreml_update_state":
                states[op.state.name] = op.value.val
                self._assign(op.outputs[0], op.value.val)
                continue
            kernel = _REFERENCE_KERNELS.get(op.op_type)
            try:
                out = kernel(op) if kernel else op.value_inference()
            except NotImplementedError as e:
                raise ExportError(f"no value inference for Core ML op {op.op_type!r}; validate on macOS") from e
            for var, value in zip(op.outputs, out if isinstance(out, tuple) else (out,)):
                self._assign(var, value)
        outputs = {v.name: np.array(v.val) for v in self.function.outputs}
        return {**outputs, **{f"{name}_out": value for name, value in states.items()}}


class MLModelPredictor:
    """Core ML itself (macOS only)."""

    def __init__(self, path: Path | str):
        ct = _coremltools()
        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """As MILProgram.predict: a StateType input `s` is written before and read back as `s_out`."""
        state_names = [s.name for s in self.model.get_spec().description.state]
        if not state_names:
            return {k: np.asarray(v) for k, v in self.model.predict(inputs).items()}
        state = self.model.make_state()
        for name in state_names:
            state.write_state(name, inputs[name])
        plain = {k: v for k, v in inputs.items() if k not in state_names}
        outputs = {k: np.asarray(v) for k, v in self.model.predict(plain, state=state).items()}
        return {**outputs, **{f"{name}_out": np.asarray(state.read_state(name)) for name in state_names}}


def load_coreml(path: Path | str):
    """(predictor, how) for a saved .mlpackage: Core ML on macOS, MIL evaluation elsewhere."""
    if platform.system() == "Darwin":
        return MLModelPredictor(path), MACOS
    return MILProgram(path), MIL
