"""Run a saved .mlpackage: `MLModel.predict` on macOS; elsewhere coremltools' MIL value inference.

On Linux Core ML cannot execute, so the saved package is loaded back into coremltools' MIL
program (`milproto.load`) and its ops are evaluated one by one with their own
`value_inference` (numpy). That proves the saved graph numerically, op by op as written.
The one op coremltools gives no value inference for (`silu`) is evaluated from its MIL
definition, x * sigmoid(x), in the op's declared dtype.

Compressed weights (`--quantize`) are `constexpr_*` ops, which coremltools does not evaluate
either: they are decompressed once, at load, by the kernels below, written from the MIL op
specification (not from coremltools' compressor), so a saved package whose stored values do not
mean what the compressor intended shows up as a wrong answer.
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

def _along(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A scalar as is; a vector shaped to broadcast along `axis` of a rank-`rank` tensor."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0:
        return values
    shape = [1] * rank
    shape[axis] = values.size
    return values.reshape(shape)


def affine_dequantize(quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """constexpr_affine_dequantize (iOS 16): scale * (quantized_data - zero_point), where scale and
    zero_point are each a scalar or a vector along `axis`; the result has scale's dtype."""
    data = np.asarray(quantized_data)
    axis = int(axis) % data.ndim
    out = _along(scale, data.ndim, axis) * (data.astype(np.float32) - _along(zero_point, data.ndim, axis))
    return out.astype(np.asarray(scale).dtype)


def _per_block(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """values (one per block) repeated to `shape`: block size along axis i is shape[i] / values.shape[i]."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != len(shape) or any(n % b for n, b in zip(shape, values.shape)):
        raise ExportError(f"block parameters of shape {values.shape} do not tile data of shape {shape}")
    for axis, (n, b) in enumerate(zip(shape, values.shape)):
        values = np.repeat(values, n // b, axis=axis)
    return values


def blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """constexpr_blockwise_shift_scale (iOS 18): output[i] = scale[i // block] * (data[i] - offset[i // block])
    per axis, block = data.shape / scale.shape; the result has scale's dtype."""
    data = np.asarray(data)
    out = data.astype(np.float32)
    if offset is not None:
        out = out - _per_block(offset, data.shape)
    return (_per_block(scale, data.shape) * out).astype(np.asarray(scale).dtype)


def lut_to_dense(indices: np.ndarray, lut: np.ndarray, shape) -> np.ndarray:
    """constexpr_lut_to_dense (iOS 16): lut[index] for each element, row-major, the n-bit indices
    (n = log2(len(lut))) packed one after another from each byte's least significant bit up."""
    lut = np.asarray(lut)
    nbits = int(np.log2(lut.size))
    if lut.ndim != 1 or 2**nbits != lut.size:
        raise ExportError(f"a look-up table of {lut.size} entries is not a power of two")
    count = int(np.prod(shape))
    bits = np.unpackbits(np.asarray(indices, dtype=np.uint8), bitorder="little")[: count * nbits]
    index = bits.reshape(count, nbits).astype(np.int64) @ (1 << np.arange(nbits, dtype=np.int64))
    return lut[index].reshape(tuple(int(d) for d in shape))


def _lut_to_dense(op):
    if "shape" not in op.inputs:  # the iOS 18 form (indices tensor, per-group tables) is not produced here
        raise NotImplementedError
    return lut_to_dense(op.indices.val, op.lut.val, op.shape.val)


def _no_kernel(op):
    raise NotImplementedError(op.op_type)


# Decompression of compressed weights: constants, evaluated once when the program is loaded.
CONSTEXPR_KERNELS = {
    "constexpr_affine_dequantize": lambda op: affine_dequantize(op.quantized_data.val, op.zero_point.val,
                                                                op.scale.val, op.axis.val),
    "constexpr_blockwise_shift_scale": lambda op: blockwise_shift_scale(
        op.data.val, op.scale.val, None if op.offset is None else op.offset.val),
    "constexpr_lut_to_dense": _lut_to_dense,
}

_REFERENCE_KERNELS = {
    "silu": lambda op: op.x.val / (1 + np.exp(-op.x.val)),
    "read_state": lambda op: op.input.val,
}


def load_program(mlmodel):
    """The MIL program of a (saved or just converted) mlprogram, as written: constants, constexpr ops and all."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = mlmodel.get_spec()
    return milproto.load(spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)


class MILProgram:
    """Evaluates one function of a saved mlprogram (`main`, or a named function of a multifunction package)
    on numpy inputs."""

    def __init__(self, path: Path | str, function: str | None = None):
        ct = _coremltools()
        from coremltools.converters.mil.mil import types

        self._types = types
        functions = load_program(ct.models.MLModel(str(path), skip_model_load=True)).functions
        if (function or "main") not in functions:
            raise ExportError(f"{path} has no Core ML function {function or 'main'!r} (it has {', '.join(sorted(functions))})")
        self.function = functions[function or "main"]
        self.decompressed: dict[str, int] = {}  # constexpr op type -> weights decompressed at load
        for op in self.function.operations:
            if op.op_type.startswith("constexpr_"):
                kernel = CONSTEXPR_KERNELS.get(op.op_type, _no_kernel)
                try:
                    self._assign(op.outputs[0], kernel(op))
                except NotImplementedError:
                    raise ExportError(f"no reference kernel for Core ML op {op.op_type!r}; validate on macOS") from None
                self.decompressed[op.op_type] = self.decompressed.get(op.op_type, 0) + 1
        self.ops = [op for op in self.function.operations
                    if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
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

    def __init__(self, path: Path | str, function: str | None = None):
        ct = _coremltools()
        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY, function_name=function)

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


def load_coreml(path: Path | str, function: str | None = None):
    """(predictor, how) for a saved .mlpackage (`function`: one of a multifunction package's): Core ML on macOS,
    MIL evaluation elsewhere."""
    if platform.system() == "Darwin":
        return MLModelPredictor(path, function), MACOS
    return MILProgram(path, function), MIL
