"""conformance.json's argmax rule (runtime/conformance.py `about`), judged by the Python runtime and by
the Node client (examples/node/lmn.mjs `judge`) alike, on hand-made cases: no graph, no torch.

A flip where the expected top-2 margin is <= 2 x logits_atol is a near tie any runtime within
logits_atol may break either way: excused and counted. A flip at a wider margin fails the case
(negative control), and so does a NaN logit; a case without margins (an older file) excuses nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from runtime.conformance import Observed, judge

NODE = shutil.which("node")
LMN_MJS = Path(__file__).resolve().parents[2] / "examples" / "node" / "lmn.mjs"
STEPS = 100
TOLERANCE = {"logits_atol": 1.0, "min_argmax_agreement": 1.0, "batch_atol": 1e-5}


def case_and_observed(flip_margin: float | None, with_margins: bool = True, nan: bool = False):
    """A quantized case of STEPS steps; the observed argmax flips at step 50, where the expected top-2
    margin is `flip_margin` (None: no flip); every other step has margin 5 (wide)."""
    want = [i % 7 for i in range(STEPS)]
    margins = [5.0] * STEPS
    got = list(want)
    if flip_margin is not None:
        margins[50] = flip_margin
        got[50] = (want[50] + 1) % 7
    logits = [0.5, -1.0, 2.0, 0.0]
    case = {"name": "synthetic", "precision": "int8", "start_pointer": "0", "tokens": want, "argmax": want,
            "logits": {"0": logits}}
    if with_margins:
        case["argmax_margins"] = margins
    seen = np.array(logits, dtype=np.float32) + 0.3  # within logits_atol
    if nan:
        seen[1] = np.nan
    return case, Observed(argmax=got, logits={0: seen})


CASES = {  # name: (case arguments, passes, excused flips)
    "no flip": ((None,), True, 0),
    "flip at a near tie (margin 0.01)": ((0.01,), True, 1),
    "flip at the bound (margin 2 x atol)": ((2.0,), True, 1),
    "negative control: flip at a wide margin (2.5)": ((2.5,), False, 0),
    "negative control: older file, no margins": ((0.01, False), False, 0),
    "negative control: NaN logit": ((None, True, True), False, 0),
}


@pytest.mark.parametrize("name", CASES)
def test_python_judge(name):
    args, passes, excused = CASES[name]
    result = judge(*_judged(args))
    assert result.passed is passes and result.excused_flips == excused, result


def _judged(args):
    case, observed = case_and_observed(*args)
    return case, TOLERANCE, observed


JUDGE = """
import { judge } from "%s";
const cases = JSON.parse(process.argv[1]);
console.log(JSON.stringify(cases.map(([kase, tolerance, observed]) => {
  observed.logits = new Map(Object.entries(observed.logits).map(([k, v]) => [Number(k), Float32Array.from(v, (x) => x ?? NaN)]));
  const r = judge(kase, tolerance, { greedy: [], margins: [], text: "", batch_gap: 0, ...observed });
  return [r.passed, r.excused_flips, r.argmax_agreement];
})));
"""


@pytest.mark.skipif(NODE is None, reason="needs Node.js (node on PATH)")
def test_node_judge_agrees_with_python():
    inputs, expected = [], []
    for args, passes, excused in CASES.values():
        case, tolerance, observed = _judged(args)
        py = judge(case, tolerance, observed)
        inputs.append([case, tolerance, {"argmax": observed.argmax,
                                         "logits": {k: [None if np.isnan(x) else float(x) for x in v]
                                                    for k, v in observed.logits.items()}}])
        expected.append([passes, excused, py.argmax_agreement])
    done = subprocess.run([NODE, "--input-type=module", "-e", JUDGE % LMN_MJS.as_uri(), json.dumps(inputs)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert np.allclose([g[2] for g in got], [e[2] for e in expected])


# ---- dynamic-int8 graphs with int8 weights (wrong on x86 without VNNI and on Arm SME) are refused ----

@pytest.mark.parametrize("weights, refused", [("int8", True), ("uint8, per output channel", False)])
def test_dynamic_int8_with_int8_weights_is_refused_in_one_line(weights, refused):
    from runtime.manifest import ManifestError
    from runtime.model import refuse_saturating_weights

    graph = {"name": "step", "precision": "dynamic-int8", "quantization": {"kind": "dynamic", "bits": 8, "weights": weights}}
    if not refused:  # negative control: what lmn-export writes now loads
        refuse_saturating_weights(Path("export"), graph)
        return
    with pytest.raises(ManifestError, match="int8 weights.*re-export with this lmn's lmn-export") as error:
        refuse_saturating_weights(Path("export"), graph)
    assert "\n" not in str(error.value)
