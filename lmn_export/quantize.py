"""Quantized copies of the ONNX graphs, each precision judged against the fp32 graphs on real text, and
repaired where it fails its gate. Rewriting one graph's weights is lmn_export.quantize_graph's job.

Precisions (`--quantize`, any of them; each one's graphs are written beside the fp32 ones as
`<stem>.<precision>.onnx`, with the same manifest `name`, `levels`, `size` and a `precision` field):

- int4, int8, weight-only: every constant weight matrix of a MatMul becomes onnxruntime's
  MatMulNBits (a Gemm, which the quantizer skips, is first rewritten as MatMul + Add), and the
  embedding table of a Gather becomes GatherBlockQuantized (uint8 storage, packed for 4 bits).
  Blocks of `--quant-block` weights along the input dimension, round to nearest with a scale and a
  zero point per block (onnxruntime's DefaultWeightOnlyQuantConfig, asymmetric: "rtn").
  accuracy_level 4: MatMulNBits quantizes its input to int8 per block and multiplies in int8;
  without it an int8 step of the shipped model ran 3.5x slower (594 vs 169 us, BENCHMARKS.md).
  Activations, biases, norms, the memory state and the attention over it stay fp32.
- dynamic-int8: onnxruntime's quantize_dynamic, for the step and the fast paths: weights uint8 with
  one scale and zero point per output channel, activations quantized to uint8 per call. Unsigned
  weights on purpose: onnxruntime's u8s8 (int8-weight) kernels on x86 without VNNI (AVX2, AVX-512F)
  add pairs of u8 x s8 products in 16 bits (vpmaddubsw), which saturates; u8u8 widens to 16 bits
  first and is exact on every kernel path, so every CPU computes the same integers. Measured on the
  shipped LogMem-32 step, 1,000 parity characters against fp32 (host AVX-512 VNNI / qemu-x86_64
  -cpu Haswell, AVX2 only): int8 weights 97.6% / 96.5% argmax agreement, max logit gap 1.04 / 4.5;
  int8 per channel 98.7% / 82.0%, 1.02 / 9.84; int8 with reduce_range (7-bit weights) 95.5% / 95.5%,
  1.63 / 1.63; uint8 per channel 98.2% / 98.2%, 0.847 / 0.847 (identical on both).

Each precision's graph set is judged like the export's other graphs, with its own gate (`GATES`):
the step graph from pointer 0, the fast paths from a pointer where they run, and each prefill graph
(its state, continued by the fp32 step) stream the parity text next to the fp32 graphs; next-token
agreement and the increase of the mean loss (nats per token) must meet the gate, NaN never passes.

A weight-only precision that fails its gate (or passes it by less than HEADROOM) is repaired where
it is weakest: the weights are ranked by the divergence each one alone causes (KL from the fp32
next-token distribution), and moved up one step (4 -> 8 bits, 8 -> fp32) in that order until every
graph of the set passes with that headroom; the manifest lists the weights so moved
(`quantization.moved_up`), and a set that fails its gate at the end fails the export.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import quantize_graph
from .graphs import GraphSpec
from .predictors import FastPathPredictor, OnnxPredictor
from .streaming import stream_logits, stream_state
from .quantize_graph import BITS, FALLBACK
from .validate import PREFILL_WARMUP, START_POINTERS, OutputDiff, ParityReport

QUANTIZE_CHOICES = ("int4", "int8", "dynamic-int8")
QUANT_BLOCKS = (16, 32, 64, 128, 256)  # the block sizes onnxruntime's MatMulNBits kernels run


@dataclass(frozen=True)
class Gate:
    min_agreement: float  # next-token agreement with the fp32 graphs
    max_loss_increase: float  # nats per token over the fp32 graphs' loss on the same text


GATES = {"int8": Gate(0.98, 0.01), "int4": Gate(0.90, 0.05), "dynamic-int8": Gate(0.90, 0.05)}
# What a repair (below) aims for, inside the gate: onnxruntime's int8 kernels round differently per
# instruction set (AVX2, AVX-512 VNNI, NEON), which can tip a near-tie on another machine; a set that
# only just passes here is repaired until it passes by this much (the gate itself stays as above).
HEADROOM = Gate(min_agreement=0.01, max_loss_increase=0.2)  # + 1 point of agreement; 20% of the loss budget


# ---- judging -------------------------------------------------------------------------------------

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _cross_entropy(logits: np.ndarray, targets: list[int]) -> float:
    return float(-_log_softmax(logits)[np.arange(len(targets)), targets].mean())


def compare(want: np.ndarray, got: np.ndarray, targets: list[int], gate: Gate, graph: str, start: int = 0) -> ParityReport:
    """Judge quantized logits `got` against fp32 `want` (both (T, V), predicting `targets`) by the gate."""
    finite = bool(np.isfinite(want).all() and np.isfinite(got).all())
    agreement = float((want.argmax(-1) == got.argmax(-1)).mean()) if finite else 0.0
    loss_fp32, loss_q = _cross_entropy(want, targets), _cross_entropy(got, targets)
    increase = max(0.0, loss_q - loss_fp32) if finite else math.inf  # NaN logits fail, never pass
    kl = float((np.exp(_log_softmax(want)) * (_log_softmax(want) - _log_softmax(got))).sum(-1).mean()) if finite else math.inf
    report = ParityReport(graph, "onnxruntime", len(targets), 1, [start], [
        OutputDiff("next_token_disagreement", 1 - agreement, 1 - gate.min_agreement),
        OutputDiff("loss_increase_nats", increase, gate.max_loss_increase),
    ])
    report.extra = {"agreement": agreement, "finite": finite,
                    **{k: v if math.isfinite(v) else None for k, v in (
                        ("loss_fp32", loss_fp32), ("loss_quantized", loss_q), ("kl_nats", kl),
                        ("max_logit_diff", float(np.abs(want - got).max()) if finite else math.inf))}}
    return report


def text_window(text_ids: list[int], tokens: int) -> list[int]:
    """The first tokens + 1 ids of the text (wrapping around a shorter one): `tokens` predictions."""
    return [int(i) for i in np.resize(np.asarray(text_ids, dtype=np.int64), tokens + 1)]


def stream_report(fp32, quantized, spec: GraphSpec, text_ids: list[int], tokens: int, gate: Gate, graph: str,
                  start: int = 0, want: np.ndarray | None = None) -> ParityReport:
    """Stream `tokens` tokens of the text through both step predictors (I/O `spec`) from pointer `start` and
    judge by `gate`."""
    ids = text_window(text_ids, tokens)
    want = stream_logits(fp32, spec, ids[:-1], start) if want is None else want
    return compare(want, stream_logits(quantized, spec, ids[:-1], start), ids[1:], gate, graph, start)


def prefill_report(fp32_step, spec: GraphSpec, prefill, size: int, text_ids: list[int], tokens: int, gate: Gate,
                   graph: str, want: np.ndarray | None = None) -> ParityReport:
    """A prefill graph judged by what it hands on, from the middle of a stream: the fp32 step reads the
    first W = min(PREFILL_WARMUP, tokens/4) tokens (an odd pointer past 2^5 on the default text), the
    prefill the next L = min(size, (tokens - W)/2) from that state, then the fp32 step continues from its
    state; its logits and the continuation's are judged against the fp32 step streaming the whole text
    (a damaged memory shows in every later token)."""
    ids = text_window(text_ids, tokens)
    n = len(ids) - 1
    warm = min(PREFILL_WARMUP, max(1, n // 4))
    length = min(size, max(1, (n - warm) // 2))
    want = stream_logits(fp32_step, spec, ids[:-1]) if want is None else want
    _, state = stream_state(fp32_step, spec, ids[:warm])
    padded = np.zeros((1, size), dtype=np.int64)
    padded[0, :length] = ids[warm : warm + length]
    out = prefill.predict({"tokens": padded, "length": np.array([length], dtype=np.int64), **state})
    state = {s.input: out[s.output] for s in spec.state}  # a prefill graph returns the step's state outputs
    rest = stream_logits(fp32_step, spec, ids[warm + length : n], state=state).reshape(-1, out["logits"].shape[-1])
    got = np.concatenate([out["logits"], rest])
    report = compare(want[warm + length - 1 :], got, ids[warm + length :], gate, graph, start=warm)
    return report


# ---- one precision's graph set, exported and judged ----------------------------------------------

class _Judge:
    """Builds a precision's graph set into a folder and judges it; the fp32 references are computed once."""

    def __init__(self, work: Path, fp32: list[dict], text_ids: list[int], tokens: int, precision: str,
                 max_levels: int):

        self.work, self.precision = work, precision
        self.text_ids, self.tokens, self.gate, self.max_levels = text_ids, tokens, GATES[precision], max_levels
        self.step = next(g for g in fp32 if g["name"] == "step")
        self.fast = [g for g in fp32 if g["name"] == "step_levels"]
        self.prefill = [g for g in fp32 if g["name"] == "prefill"]
        self.OnnxPredictor, self.FastPathPredictor = OnnxPredictor, FastPathPredictor
        self.spec = GraphSpec.from_dict(self.step)  # every step graph's I/O, the fast paths' too
        self.fp32_step = OnnxPredictor(work / self.step["file"])
        ids = text_window(text_ids, tokens)[:-1]
        self.want = stream_logits(self.fp32_step, self.spec, ids)
        self.fp32_fast = None
        if self.fast:
            self.fp32_fast = FastPathPredictor(self.fp32_step, {g["levels"]: OnnxPredictor(work / g["file"])
                                                                for g in self.fast}, max_levels)
            self.want_fast = stream_logits(self.fp32_fast, self.spec, ids, START_POINTERS[1])

    def judge_step(self, folder: Path, entry: dict) -> ParityReport:
        return stream_report(self.fp32_step, self.OnnxPredictor(folder / entry["file"]), self.spec, self.text_ids, self.tokens,
                             self.gate, f"onnx step {self.precision}", want=self.want)

    def judge_prefill(self, folder: Path, entry: dict) -> ParityReport:
        return prefill_report(self.fp32_step, self.spec, self.OnnxPredictor(folder / entry["file"]), entry["size"], self.text_ids,
                              self.tokens, self.gate, f"onnx prefill {entry['size']} {self.precision}", want=self.want)

    def judge_fast(self, folder: Path, step: dict, fast: list[dict]) -> ParityReport:
        predictor = self.FastPathPredictor(self.OnnxPredictor(folder / step["file"]),
                                           {g["levels"]: self.OnnxPredictor(folder / g["file"]) for g in fast},
                                           self.max_levels)
        report = stream_report(self.fp32_fast, predictor, self.spec, self.text_ids, self.tokens, self.gate,
                               f"onnx fast paths {self.precision}", START_POINTERS[1], want=self.want_fast)
        report.extra["fast_path_steps"] = {str(k): n for k, n in sorted(predictor.used.items())}
        return report

    def build(self, block: int, plan: dict, entries: list[dict] | None = None) -> tuple[list[dict], list[ParityReport]]:
        """Write every graph of the set (or `entries`) into the work folder; their entries and reports."""
        entries = entries if entries is not None else [self.step, *self.fast, *self.prefill]
        copies = [quantize_graph.write_quantized_copy(self.work, g, self.precision, block, plan) for g in entries]
        step = next(c for c in copies if c["name"] == "step")
        reports = [self.judge_step(self.work, step)]
        fast = [c for c in copies if c["name"] == "step_levels"]
        if fast:
            reports.append(self.judge_fast(self.work, step, fast))
        reports += [self.judge_prefill(self.work, c) for c in copies if c["name"] == "prefill"]
        return copies, reports

    def sensitivity(self, block: int) -> list[str]:
        """Weight keys, most damaging first: the KL each one alone at this precision causes (all other
        weights fp32), measured on the step graph, or on the smallest prefill for weights only it has."""

        keys_of = {}
        for g in [self.step, *sorted(self.prefill, key=lambda g: g["size"])]:
            model = quantize_graph.folded_constants(self.work / g["file"])  # as quantize_weight_only sees the graph
            quantize_graph.matmul_form(model)
            keys_of[g["file"]] = set(quantize_graph.weight_keys(model).values())
        every = set().union(*keys_of.values())
        score = {}
        with tempfile.TemporaryDirectory(prefix="lmn-quant-") as scratch:
            folder = Path(scratch)
            for g in [self.step, *sorted(self.prefill, key=lambda g: g["size"])]:
                for key in sorted(keys_of[g["file"]] - set(score)):
                    plan = {k: None for k in every if k != key}
                    quantize_graph.quantize_weight_only(self.work / g["file"], folder / g["file"], self.precision, block, plan)
                    report = (self.judge_step if g["name"] == "step" else self.judge_prefill)(folder, g)
                    score[key] = report.extra["kl_nats"] if report.extra["kl_nats"] is not None else math.inf
        return sorted(score, key=lambda k: (-score[k], k))


def export_precision(work: Path, fp32: list[dict], text_ids: list[int], tokens: int, precision: str, block: int,
                     max_levels: int, progress) -> tuple[list[dict], list[ParityReport]]:
    """Write one precision's copies of the fp32 graphs `fp32` (step, fast paths, prefill) into `work`
    and judge them; returns their manifest entries and reports (a failed report fails the export)."""
    if precision == "dynamic-int8":  # the step and the fast paths, as before; prefill stays fp32
        entries = [g for g in fp32 if g["name"] in ("step", "step_levels")]
        progress(f"quantizing {len(entries)} ONNX step graph(s) to dynamic-int8")
        judge = _Judge(work, entries, text_ids, tokens, precision, max_levels)
        return judge.build(block, {}, entries)
    progress(f"quantizing {len(fp32)} ONNX graph(s) to {precision} (weight-only, block {block})")
    judge = _Judge(work, fp32, text_ids, tokens, precision, max_levels)
    copies, reports = judge.build(block, {})
    if _on_target(reports, judge.gate):
        return copies, reports
    order = judge.sensitivity(block)
    up = FALLBACK[BITS[precision]]
    progress(f"{precision} misses its gate or its headroom ({_summary(reports)}); moving the most sensitive "
             f"of {len(order)} weights to {'int8' if up else 'fp32'} until it passes")
    for count in range(1, len(order) + 1):
        plan = {k: up for k in order[:count]}
        with tempfile.TemporaryDirectory(prefix="lmn-quant-") as scratch:  # the step alone first: it is cheap
            quantize_graph.quantize_weight_only(work / judge.step["file"], Path(scratch) / judge.step["file"], precision, block, plan)
            if not _on_target([judge.judge_step(Path(scratch), judge.step)], judge.gate):
                continue
        copies, reports = judge.build(block, plan)
        if _on_target(reports, judge.gate):
            progress(f"{precision} passes with {count} of {len(order)} weights moved up ({_summary(reports)})")
            break
    return copies, reports


def _on_target(reports: list[ParityReport], gate: Gate) -> bool:
    """Every report passes its gate, with HEADROOM to spare."""
    return all(r.passed and r.extra["agreement"] >= gate.min_agreement + HEADROOM.min_agreement
               and r.outputs[1].max_abs_diff <= gate.max_loss_increase * (1 - HEADROOM.max_loss_increase)
               for r in reports)


def _summary(reports: list[ParityReport]) -> str:
    worst = min(reports, key=lambda r: r.extra["agreement"])
    return f"worst agreement {worst.extra['agreement']:.1%} on {worst.graph}"
