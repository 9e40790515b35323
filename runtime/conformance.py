"""Conformance vectors (`conformance.json` in an export folder): token streams with the outputs any
runtime must reproduce, and the check that runs them through this runtime (`lmn-verify`).

A case feeds `tokens` one by one (teacher-forced) to a stream that starts at `start_pointer`
(decimal string; the initial state otherwise), or `prompt` at once first (where a runtime may use
a prefill graph) and then `tokens`. After each token it reads the logits: their argmax (the lowest
id among equal maxima) must agree with `argmax` on at least `min_argmax_agreement` of the steps,
and at the steps listed in `logits` every value must be within `logits_atol`. A `greedy` case then
generates `greedy.ids` by argmax; a different id is allowed only where the expected top-2 margin
(`greedy.margins`) is within 2 x logits_atol (a tie a conforming runtime may break either way).
Tolerances are per precision (`tolerances`), so a third-party runtime can run the same file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import read_json
from .model import PRECISIONS
from .reader import excerpt

FILE = "conformance.json"
FORMAT = "lmn-conformance"
FORMAT_VERSION = 1


class ConformanceError(Exception):
    """A conformance file that cannot be read; the message says what to do."""


@dataclass
class Observed:
    """What a stream produced for one case."""

    argmax: list[int]
    logits: dict[int, np.ndarray]  # step -> (V,) at the steps the case checks
    greedy: list[int] = field(default_factory=list)
    greedy_margins: list[float] = field(default_factory=list)  # top-2 logit margin where each greedy id was chosen


def argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))  # numpy returns the first of equal maxima, as the contract says


def margin(logits: np.ndarray) -> float:
    top = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return float(top[1] - top[0])


def run_case(model, case: dict, check_steps: list[int], greedy: int = 0) -> Observed:
    """Run one case through a fresh runtime.Stream of `model` (an ExportedModel)."""
    from .stream import Stream

    stream = Stream(model, pointer=int(case["start_pointer"]))
    observed = Observed([], {})
    wanted = set(check_steps)
    # the prompt at once (the runtime picks prefill or steps, as for a user's prompt), then one token per step
    feeds = ([case["prompt"]] if case.get("prompt") else []) + [[token] for token in case["tokens"]]
    for step, ids in enumerate(feeds):
        stream.feed_ids(ids)
        observed.argmax.append(argmax(stream.logits))
        if step in wanted:
            observed.logits[step] = np.array(stream.logits, dtype=np.float32)
    for _ in range(greedy):
        token = argmax(stream.logits)
        observed.greedy.append(token)
        observed.greedy_margins.append(margin(stream.logits))
        stream.feed_ids([token])
    return observed


@dataclass
class CaseResult:
    name: str
    precision: str
    passed: bool
    argmax_agreement: float
    max_logit_gap: float | None  # None: a non-finite logit (always a failure)
    greedy_ok: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def judge(case: dict, tolerance: dict, observed: Observed) -> CaseResult:
    """Compare a case's observed outputs with its expected ones under the precision's tolerance."""
    want = case["argmax"]
    agreement = sum(a == b for a, b in zip(observed.argmax, want)) / len(want) if want else 1.0
    gap = 0.0
    for step, expected in case["logits"].items():
        got, expected = observed.logits.get(int(step)), np.asarray(expected, dtype=np.float64)
        if got is None or got.shape != expected.shape or not (np.isfinite(got).all() and np.isfinite(expected).all()):
            gap = None  # a missing or non-finite logit on either side is a failure, never a pass
            break
        gap = max(gap, float(np.abs(got.astype(np.float64) - expected).max()))
    atol = tolerance["logits_atol"]
    greedy_ok, detail = True, ""
    expected_greedy = case.get("greedy", {}).get("ids", [])
    for i, (got_id, want_id) in enumerate(zip(observed.greedy, expected_greedy)):
        if got_id != want_id:
            greedy_ok = case["greedy"]["margins"][i] <= 2 * atol
            detail = f"greedy token {i}: {got_id} vs {want_id} (expected margin {case['greedy']['margins'][i]:.3g})"
            break
    if len(observed.greedy) != len(expected_greedy):
        greedy_ok, detail = False, f"generated {len(observed.greedy)} greedy tokens, expected {len(expected_greedy)}"
    passed = (gap is not None and gap <= atol and agreement >= tolerance["min_argmax_agreement"] and greedy_ok
              and len(observed.argmax) == len(want))
    return CaseResult(case["name"], case["precision"], passed, agreement, gap, greedy_ok, detail)


MAX_BYTES = 64 << 20  # the shipped conformance.json is about 300 KB


def read_cases(directory: Path) -> dict:
    path = Path(directory) / FILE
    if not path.exists():
        raise ConformanceError(f"{directory} has no {FILE} (exports before manifest format 2 lack it); re-export the model")
    data = read_json(path, ConformanceError, MAX_BYTES)
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ConformanceError(f"{path} is not an {FORMAT} file of version {FORMAT_VERSION}; re-export the model")
    problem = cases_problem(data)
    if problem:
        raise ConformanceError(f"{path} is malformed: {problem}; re-export the model")
    return data


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ids(value) -> bool:
    return isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)


def cases_problem(data: dict) -> str | None:
    """What makes a conformance file unusable (a tolerance that passes anything, a case without its
    fields), or None. JSON numbers are finite already (runtime.reader)."""
    tolerances = data.get("tolerances")
    if not isinstance(tolerances, dict) or not isinstance(data.get("cases"), list):
        return "it needs 'tolerances' (an object) and 'cases' (a list)"
    for precision, tolerance in tolerances.items():
        if not isinstance(tolerance, dict) or not (_number(tolerance.get("logits_atol")) and 0 <= tolerance["logits_atol"] <= 100):
            return f"tolerances.{excerpt(precision)}.logits_atol must be a number in [0, 100]"
        if not (_number(tolerance.get("min_argmax_agreement")) and 0 <= tolerance["min_argmax_agreement"] <= 1):
            return f"tolerances.{excerpt(precision)}.min_argmax_agreement must be a number in [0, 1]"
    for i, case in enumerate(data["cases"]):
        where = f"case {i}"
        if not isinstance(case, dict) or not isinstance(case.get("name"), str) or case.get("precision") not in tolerances \
                or case["precision"] not in PRECISIONS:
            return f"{where} needs a name and a precision ({', '.join(PRECISIONS)}) listed under 'tolerances'"
        pointer = case.get("start_pointer")
        if not (isinstance(pointer, str) and pointer.isdigit() and len(pointer) <= 20):
            return f"{where} ({excerpt(case['name'])}) needs start_pointer as a decimal string"
        if not (_ids(case.get("tokens")) and _ids(case.get("prompt", [])) and _ids(case.get("argmax"))):
            return f"{where} ({excerpt(case['name'])}) needs tokens, argmax (and prompt) as lists of token ids"
        logits = case.get("logits")
        if not isinstance(logits, dict) or not all(
                k.isdigit() and isinstance(v, list) and all(map(_number, v)) for k, v in logits.items()):
            return f"{where} ({excerpt(case['name'])}) needs logits as {{step: [numbers]}}"
        greedy = case.get("greedy", {"ids": [], "margins": []})
        if not (isinstance(greedy, dict) and _ids(greedy.get("ids")) and isinstance(greedy.get("margins"), list)
                and len(greedy["margins"]) == len(greedy["ids"]) and all(map(_number, greedy["margins"]))):
            return f"{where} ({excerpt(case['name'])}) needs greedy as {{ids, margins}} of one length"
    return None


def verify(directory: Path | str, backend: str = "onnxruntime", precisions: tuple[str, ...] | None = None,
           threads: int = 1) -> list[CaseResult]:
    """Run every case of the folder's conformance.json whose precision this backend has; one result per case."""
    from .model import load
    from .stream import ContextFullError

    directory = Path(directory)
    data = read_cases(directory)
    results = []
    models = {}
    for case in data["cases"]:
        precision = case["precision"]
        if precisions is not None and precision not in precisions:
            continue
        if backend == "coreml" and precision != "fp32":
            continue  # the Core ML backend runs the export's Core ML step graph (its own precision)
        if precision not in models:
            models[precision] = load(directory, threads=threads, backend=backend,
                                     precision=precision if backend == "onnxruntime" else "fp32")
        checks = [int(s) for s in case["logits"]]
        try:
            observed = run_case(models[precision], case, checks, len(case.get("greedy", {}).get("ids", [])))
        except (ValueError, ContextFullError) as e:  # ids outside the vocabulary, a pointer outside the graphs
            raise ConformanceError(f"{directory / FILE}: case {excerpt(case['name'])} cannot run here ({e}); "
                                   "re-export the model") from None
        results.append(judge(case, data["tolerances"][precision], observed))
    return results
