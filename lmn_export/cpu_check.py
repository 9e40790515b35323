"""The export's conformance vectors, run on a CPU class other than the exporting machine's.

onnxruntime picks its integer kernels by instruction set when a session starts: an int8 graph that
is right on this machine's kernels (AVX-512 VNNI, say) can be wrong on another's. The clearest case
was dynamic-int8 with int8 weights: on x86 without VNNI (AVX2, AVX-512F) onnxruntime's u8s8 kernel
adds pairs of products in 16 bits and saturates, and the shipped export that passed its gate here
missed its conformance tolerance there (logit gaps 1.1 to 4.5). So, when `qemu-x86_64` is
installed, the export runs `lmn-verify` on its own folder under `qemu-x86_64 -cpu Haswell` (AVX2 and
FMA, no AVX-512, no VNNI: onnxruntime's AVX2 kernels) and fails when a case fails there. qemu
emulates the instructions exactly, so this judges the kernels' arithmetic, not their speed.

aarch64 (NEON, dot product) is checked by `.ci/aarch64`, which needs an arm64 tree and wheels.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .validate import ValidationError

# kernel class -> the emulator command that runs this machine's Python on it
EMULATED = {"x86-64 AVX2, no VNNI (qemu-x86_64 -cpu Haswell)": ("x86_64", ["qemu-x86_64", "-cpu", "Haswell"])}
TIMEOUT_S = 900  # the shipped export's 16 cases take about 30 s under qemu on one core


def check_other_cpus(directory: Path, progress=lambda message: None) -> list[dict]:
    """Run lmn-verify on `directory` for each emulated kernel class this host can run; one record
    each: {"cpu", "passed", "cases"} or {"cpu", "skipped": why}. Raises ValidationError with one line
    naming the first failed case when a class fails."""
    records = []
    for cpu, (machine, command) in EMULATED.items():
        if platform.machine() != machine:
            records.append({"cpu": cpu, "skipped": f"the exporting machine is {platform.machine()}"})
            continue
        if shutil.which(command[0]) is None:
            records.append({"cpu": cpu, "skipped": f"{command[0]} not found (Debian/Ubuntu: apt-get install qemu-user)"})
            continue
        progress(f"running the conformance vectors on {cpu}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this interpreter's packages
        done = subprocess.run([*command, sys.executable, "-m", "runtime.verify", str(directory), "--json"],
                              capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise ValidationError(f"lmn-verify under {' '.join(command)} did not run (exit {done.returncode}): "
                               f"{done.stderr.strip().splitlines()[-1:] or 'no output'}") from None
        failed = [c for c in result["cases"] if not c["passed"]]
        if failed:
            c = failed[0]
            raise ValidationError(f"{len(failed)} conformance case(s) fail on {cpu}, first {c['precision']} {c['name']}: "
                               f"argmax agreement {c['argmax_agreement']:.1%}, max logit gap {c['max_logit_gap']}")
        records.append({"cpu": cpu, "passed": True, "cases": len(result["cases"])})
    return records
