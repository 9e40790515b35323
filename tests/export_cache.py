"""A content-addressed cache of ONNX exports for the test session (tests/conftest.py installs it).

Most export tests trace the same tiny models into the same graphs: torch.onnx.export takes 8-35 s a
graph on CI's cores and was most of the suite's time. `_export` is wrapped so that a graph already
exported in this session, from the same inputs, is written from the bytes the exporter produced the
first time; everything after it (parity, quantization, the manifest, the files) runs as usual.

The key holds everything the exported bytes depend on that a test can change: the graph module's
class, every submodule's class and plain attributes (configs, levels, flags), every parameter and
buffer, the example arguments, the spec, the opset, and the code that traces: module-level constants,
functions and class methods of `models.*` and `lmn_export.graphs` / `lmn_export.onnx_export`, by
name and qualified name (a monkeypatched function or constant changes it), and which function
`torch.onnx.export` is. The cache lives under the session's base temp folder (shared by xdist's
workers) and starts empty each run. A test marked `no_export_cache` (bytes reproducibility) bypasses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import sys
from pathlib import Path

TRACED_MODULES = ("models", "lmn_export.graphs", "lmn_export.onnx_export")
PLAIN = (int, float, bool, str, type(None))


def _plain(value) -> str | None:
    """A stable text for a value that can change a traced graph, or None for values that cannot."""
    import torch

    if isinstance(value, PLAIN) or isinstance(value, torch.dtype):
        return repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return repr(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, PLAIN) for v in value):
        return repr(value)
    return None


def _code_fingerprint(digest) -> None:
    import torch

    for name in sorted(sys.modules):
        if not any(name == m or name.startswith(m + ".") for m in TRACED_MODULES):
            continue
        module = sys.modules[name]
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("__"):
                continue
            text = _plain(value)
            if text is None and callable(value):
                text = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
                if inspect.isclass(value) and value.__module__ == name:
                    text += repr(sorted((k, getattr(v, "__qualname__", "")) for k, v in vars(value).items()
                                        if callable(v) or isinstance(v, (staticmethod, classmethod, property))))
            if text is not None:
                digest.update(f"{name}.{attr}={text}\n".encode())
    export = torch.onnx.export
    digest.update(f"torch.onnx.export={export.__module__}.{export.__qualname__}\n".encode())


def export_key(graph, args: tuple, spec, opset: int) -> str:
    import torch

    digest = hashlib.sha256()
    digest.update(f"{type(graph).__module__}.{type(graph).__qualname__}|{spec!r}|{opset}\n".encode())
    for name, module in graph.named_modules():
        attrs = sorted((k, _plain(v)) for k, v in vars(module).items() if not k.startswith("_"))
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}:{attrs}\n".encode())
    for name, tensor in list(graph.state_dict(keep_vars=False).items()) + [(f"arg{i}", a) for i, a in enumerate(args)]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        tensor = tensor.detach().cpu().contiguous().reshape(-1)  # flat: a 0-d tensor cannot be viewed as bytes
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    _code_fingerprint(digest)
    return digest.hexdigest()


def cached(real_export, folder: Path, enabled):
    """`_export` with the cache in front of it; `enabled()` says whether the running test allows it."""
    def export(graph, args, spec, path, opset):
        if not enabled():
            return real_export(graph, args, spec, path, opset)
        entry = folder / f"{export_key(graph, args, spec, opset)}.onnx"
        hit = entry.is_file()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "ledger.txt", "a", encoding="utf-8") as ledger:  # hits and misses, for the curious
            ledger.write(f"{'hit' if hit else 'miss'} {entry.stem[:12]} {type(graph).__name__}\n")
        if hit:
            sys.modules["lmn_export.onnx_export"].write_atomic(Path(path), entry.read_bytes())
            return None
        result = real_export(graph, args, spec, path, opset)
        staged = folder / f".{entry.name}.{os.getpid()}"
        staged.write_bytes(Path(path).read_bytes())
        os.replace(staged, entry)  # another worker may have written the same bytes: either copy is the graph
        return result

    return export
