"""Conformance vectors (`conformance.json` in an export folder): token streams with the outputs any
runtime must reproduce, and the check that runs them through this runtime (`lmn-verify`).

Running a case. Load the export at the case's `precision` (its step, step_levels and prefill
graphs as lmn.json says). Start a stream at `start_pointer` (decimal string) with the initial
state. If the case has `prompt`, feed all its ids in one call (a runtime may use a prefill graph,
as for a user's prompt) and read the logits once; then feed `tokens` one id per call, reading the
logits (V,) after each; then, if the case has `chunks`, feed each chunk's ids in one call (in the
middle of the stream: a runtime may prefill from the stream's state) and read the logits after
each. Step s is the s-th read (the prompt, when there is one, is step 0). A
case with `greedy` then repeats len(greedy.ids) times: choose the argmax of the current logits,
record it and the top-2 margin of those logits, feed it, and decode it with the stream's text
decoder (which still holds the bytes of an incomplete character fed before, lmn.json
`vocabulary.decoder`), appending the characters it completes. A case with `decode` runs no graph:
its ids go one by one through a fresh stream's text decoder, as generated tokens.

Judging a case, with `tolerances[precision]` (a runtime's own outputs, never another case's):
- argmax: at each step the lowest id among the equal maxima of the logits. A step agrees when it
  equals `argmax[s]`, or when it differs where the expected top-2 margin `argmax_margins[s]` is
  <= 2 x logits_atol: a near tie that a runtime within logits_atol of every expected logit may break
  either way (an excused flip, counted and reported). The share of steps that agree must be
  >= min_argmax_agreement (1.0 in files written now: a flip where the margin is wider means some
  logit moved by more than logits_atol), and the number of steps must be len(argmax). A case without
  `argmax_margins` (older files) excuses no flip;
- logits: at each step s listed in `logits`, max_i |logits[i] - expected[i]| (in float64) must be
  <= logits_atol; a missing, wrongly sized or non-finite (NaN, inf) logit on either side fails;
- greedy: the ids must equal `greedy.ids`, except that at the first difference the case still passes
  when the expected margin there is <= 2 x logits_atol (the same near-tie rule: generation stops
  being comparable there); when every id matches, the decoded text must equal `greedy.text` exactly;
- decode: the decoded text must equal `text` exactly;
- batch_with: streams (start_pointer, tokens: as many as the case's) that a runtime which batches
  runs with the case's stream as rows of one call, where every graph used has lmn.json `batch_rows`
  "independent", else each stream alone. The case's stream is judged as above, and its logits at the
  `logits` steps must equal the logits the same runtime gives for that stream run alone within
  batch_atol (batch_gap): a runtime that batches a "coupled" graph fails here. A runtime that never
  batches has batch_gap 0.
Tolerances: fp32 2e-4 (the export gates every graph at 1e-4 from PyTorch); quantized graphs 1.0
(their int8 activation kernels round differently per implementation: x86 AVX2 or VNNI, ARM NEON
with or without dot product, WebAssembly); min_argmax_agreement 1.0; batch_atol 1e-5 (a row run
alone and in a batch by the same kernels gives the same numbers). An LMN export's cases run at
least 100 steps, except prefill-mid-stream (45 steps and two chunks: its point is where the chunks
start).
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
    margins: list[float] = field(default_factory=list)  # top-2 logit margin at each step (as argmax)
    greedy: list[int] = field(default_factory=list)
    greedy_margins: list[float] = field(default_factory=list)  # top-2 logit margin where each greedy id was chosen
    text: str = ""  # what the stream's decoder yielded for the greedy ids (or a decode case's ids)
    batch_gap: float = 0.0  # max |batched - alone| logit of the case's stream: 0 here, this runtime never batches


def argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))  # numpy returns the first of equal maxima, as the contract says


def margin(logits: np.ndarray) -> float:
    top = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return float(top[1] - top[0])


def run_case(model, case: dict, check_steps: list[int], greedy: int = 0) -> Observed:
    """Run one case through a fresh runtime.Stream of `model` (an ExportedModel), one stream per call."""
    from .stream import Stream

    stream = Stream(model, pointer=int(case.get("start_pointer", "0")))
    observed = Observed([], {})
    if "decode" in case:  # the text decoder alone: ids as generated tokens
        observed.text = "".join(stream.decoder.decode(i) for i in case["decode"]["ids"])
        return observed
    wanted = set(check_steps)
    # the prompt at once (the runtime picks prefill or steps, as for a user's prompt), one token per step,
    # then each chunk at once from the stream's state
    feeds = ([case["prompt"]] if case.get("prompt") else []) + [[token] for token in case["tokens"]] + case.get("chunks", [])
    for step, ids in enumerate(feeds):
        stream.feed_ids(ids)
        observed.argmax.append(argmax(stream.logits))
        observed.margins.append(margin(stream.logits))
        if step in wanted:
            observed.logits[step] = np.array(stream.logits, dtype=np.float32)
    for _ in range(greedy):
        observed.greedy.append(argmax(stream.logits))
        observed.greedy_margins.append(margin(stream.logits))
        observed.text += "".join(stream.generate(1, temperature=0))  # feeds the argmax, decodes it
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
    excused_flips: int = 0  # argmax differences at near ties (expected margin <= 2 x logits_atol)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def judge(case: dict, tolerance: dict, observed: Observed) -> CaseResult:
    """Compare a case's observed outputs with its expected ones under the precision's tolerance (`about`)."""
    if "decode" in case:
        passed = observed.text == case["decode"]["text"]
        return CaseResult(case["name"], case["precision"], passed, 1.0, 0.0, True,
                          "" if passed else f"decoded {observed.text!r}, expected {case['decode']['text']!r}")
    want, atol = case["argmax"], tolerance["logits_atol"]
    margins = case.get("argmax_margins") or [math.inf] * len(want)  # older files: no flip is excused
    same = sum(a == b for a, b in zip(observed.argmax, want))
    excused = sum(a != b and m <= 2 * atol for a, b, m in zip(observed.argmax, want, margins))
    agreement = (same + excused) / len(want) if want else 1.0
    gap = 0.0
    for step, expected in case["logits"].items():
        got, expected = observed.logits.get(int(step)), np.asarray(expected, dtype=np.float64)
        if got is None or got.shape != expected.shape or not (np.isfinite(got).all() and np.isfinite(expected).all()):
            gap = None  # a missing or non-finite logit on either side is a failure, never a pass
            break
        gap = max(gap, float(np.abs(got.astype(np.float64) - expected).max()))
    greedy_ok, detail = True, ""
    expected_greedy = case.get("greedy", {}).get("ids", [])
    for i, (got_id, want_id) in enumerate(zip(observed.greedy, expected_greedy)):
        if got_id != want_id:
            greedy_ok = case["greedy"]["margins"][i] <= 2 * atol
            detail = f"greedy token {i}: {got_id} vs {want_id} (expected margin {case['greedy']['margins'][i]:.3g})"
            break
    else:
        if "text" in case.get("greedy", {}) and observed.greedy == expected_greedy and observed.text != case["greedy"]["text"]:
            greedy_ok, detail = False, f"greedy text {observed.text!r}, expected {case['greedy']['text']!r}"
    if len(observed.greedy) != len(expected_greedy):
        greedy_ok, detail = False, f"generated {len(observed.greedy)} greedy tokens, expected {len(expected_greedy)}"
    batch_ok = observed.batch_gap <= tolerance.get("batch_atol", 0.0)  # NaN compares False: a failure
    if not batch_ok:
        detail = f"batched rows differ from the stream alone by {observed.batch_gap:.3g} (batch_rows)"
    passed = (gap is not None and gap <= atol and agreement >= tolerance["min_argmax_agreement"] and greedy_ok
              and batch_ok and len(observed.argmax) == len(want))
    return CaseResult(case["name"], case["precision"], passed, agreement, gap, greedy_ok, detail, excused)


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
        if "decode" in case:  # the text decoder alone
            decode = case["decode"]
            if not (isinstance(decode, dict) and _ids(decode.get("ids")) and isinstance(decode.get("text"), str)):
                return f"{where} ({excerpt(case['name'])}) needs decode as {{ids, text}}"
            continue
        streams = [case] + (case["batch_with"] if isinstance(case.get("batch_with"), list) else [])
        for stream in streams:
            pointer = stream.get("start_pointer") if isinstance(stream, dict) else None
            if not (isinstance(pointer, str) and pointer.isdigit() and len(pointer) <= 20):
                return f"{where} ({excerpt(case['name'])}) needs start_pointer as a decimal string (batch_with too)"
            if not _ids(stream.get("tokens")):
                return f"{where} ({excerpt(case['name'])}) needs tokens as lists of token ids (batch_with too)"
        if "batch_with" in case and not isinstance(case["batch_with"], list):
            return f"{where} ({excerpt(case['name'])}) needs batch_with as a list of streams"
        chunks = case.get("chunks", [])
        if not (_ids(case.get("prompt", [])) and _ids(case.get("argmax"))
                and isinstance(chunks, list) and all(_ids(c) and c for c in chunks)):
            return f"{where} ({excerpt(case['name'])}) needs argmax (and prompt, chunks) as lists of token ids"
        margins = case.get("argmax_margins", [])
        if not (isinstance(margins, list) and all(map(_number, margins)) and len(margins) in (0, len(case["argmax"]))):
            return f"{where} ({excerpt(case['name'])}) needs argmax_margins as numbers, one per argmax step"
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
        checks = [int(s) for s in case.get("logits", {})]
        try:
            observed = run_case(models[precision], case, checks, len(case.get("greedy", {}).get("ids", [])))
        except (ValueError, ContextFullError) as e:  # ids outside the vocabulary, a pointer outside the graphs
            raise ConformanceError(f"{directory / FILE}: case {excerpt(case['name'])} cannot run here ({e}); "
                                   "re-export the model") from None
        results.append(judge(case, data["tolerances"][precision], observed))
    return results
