"""dynamic-int8 computes the same numbers on x86 with and without VNNI (lmn_export.quantize), and the
emulated CPU the export checks on really runs other kernels (the negative control).

Needs `qemu-x86_64` (Debian: qemu-user; .ci/run installs it) and onnx, not torch: the shipped fp32
step graph is quantized here, as the exporter does, and streamed on this CPU and under
`qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512, no VNNI).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="quantizing needs the [export] install (onnx)")

from lmn_export.cpu_check import EMULATED  # noqa: E402
from lmn_export.quantize_graph import quantize_dynamic_file  # noqa: E402
from runtime.model import SMALL_EXPORT  # noqa: E402

HASWELL = EMULATED["x86-64 AVX2, no VNNI (qemu-x86_64 -cpu Haswell)"][1]
pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which(HASWELL[0]) is None,
                                reason="needs an x86-64 host with qemu-x86_64 (apt-get install qemu-user)")

# 200 random token ids through the step graph from the empty state; logits (200, V) saved as .npy
STREAM = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[1].shape]
memory, pointer, out = np.zeros(shape, np.float32), np.zeros(1, np.int64), []
vocab = session.get_outputs()[0].shape[1]
for token in np.random.default_rng(0).integers(0, vocab, 200):
    logits, memory, pointer = session.run(None, {"token": np.array([token]), "memory": memory, "pointer": pointer})
    out.append(logits[0])
np.save(sys.argv[2], np.array(out))
"""


def logits_here_and_on_haswell(graph: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    outs = []
    for name, prefix in (("here", []), ("haswell", HASWELL)):
        subprocess.run([*prefix, sys.executable, "-c", STREAM, str(graph), str(tmp_path / f"{name}.npy")],
                       check=True, capture_output=True, timeout=300)
        outs.append(np.load(tmp_path / f"{name}.npy").astype(np.float64))
    return outs[0], outs[1]


def has_vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def test_dynamic_int8_gives_the_same_logits_without_vnni(tmp_path):
    # uint8 weights: every kernel path sums exact integer products, so the logits are the same
    # integers dequantized on both CPUs; the fp32 parts (norms, attention) may order sums differently
    # with or without AVX-512, hence 1e-4 (measured: bit-identical on the shipped step).
    quantize_dynamic_file(SMALL_EXPORT / "model.onnx", tmp_path / "q.onnx")
    here, haswell = logits_here_and_on_haswell(tmp_path / "q.onnx", tmp_path)
    assert np.isfinite(here).all() and np.isfinite(haswell).all()
    assert np.abs(here - haswell).max() <= 1e-4
    assert (here.argmax(1) == haswell.argmax(1)).all()


@pytest.mark.skipif(not has_vnni(), reason="the control needs a VNNI host (AVX-512 VNNI or AVX-VNNI): without it "
                                           "both runs take the same AVX2 kernels")
def test_negative_control_int8_weights_differ_without_vnni(tmp_path):
    # what dynamic-int8 used to write (int8 weights, u8s8 kernels): the AVX2 kernel saturates, so the
    # Haswell run differs (measured: max gap 3.0, 9 of 200 argmax flips) far beyond the 1.0 the
    # conformance vectors allow. If this stops failing, qemu no longer reaches another kernel path.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(SMALL_EXPORT / "model.onnx"), str(tmp_path / "s8.onnx"), weight_type=QuantType.QInt8)
    here, haswell = logits_here_and_on_haswell(tmp_path / "s8.onnx", tmp_path)
    assert np.abs(here - haswell).max() > 1.0


@pytest.mark.parametrize("tampered", [False, True])
def test_the_exports_check_on_haswell_fails_a_case_that_fails_there(export_dir, tmp_path, tampered):
    """lmn_export.cpu_check runs lmn-verify under qemu Haswell: the committed tiny export passes there
    (its 6 fp32 cases), and the same folder with one expected argmax shifted at a wide margin
    fails the check with one line naming the case (the gate's negative control)."""
    import json
    import shutil

    from lmn_export.cpu_check import check_other_cpus
    from lmn_export.validate import ValidationError
    from runtime.manifest import file_digest, file_size, manifest_text

    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    if tampered:
        data = json.loads((folder / "conformance.json").read_text(encoding="utf-8"))
        case, atol = data["cases"][0], data["tolerances"][data["cases"][0]["precision"]]["logits_atol"]
        step = next(s for s, m in enumerate(case["argmax_margins"]) if m > 2 * atol)
        case["argmax"][step] = (case["argmax"][step] + 1) % len(case["logits"]["0"])
        (folder / "conformance.json").write_text(json.dumps(data), encoding="utf-8")
        manifest = json.loads((folder / "lmn.json").read_text(encoding="utf-8"))
        manifest["files"]["conformance.json"].update(sha256=file_digest(folder / "conformance.json"),
                                                     bytes=file_size(folder / "conformance.json"))
        (folder / "lmn.json").write_text(manifest_text(manifest), encoding="utf-8")
        with pytest.raises(ValidationError, match=f"fail on x86-64 AVX2, no VNNI.*{case['name']}") as error:
            check_other_cpus(folder)
        assert "\n" not in str(error.value)
    else:
        assert check_other_cpus(folder) == [{"cpu": next(iter(EMULATED)), "passed": True, "cases": 6}]
