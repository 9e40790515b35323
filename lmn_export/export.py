"""Export a checkpoint to an export folder: graphs, parity reports and the `lmn.json` manifest.

Everything is written to a staging folder beside the destination and moved into place only after
every parity check has passed (`output_folder`), so a failed or killed export never leaves a
half-written folder behind and never deletes a folder it was not asked to replace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime  # noqa: F401 - imported up front: a signal during a lazy C-extension import breaks it
import torch

from runtime.atomic import remove_stale_folders, staged_folder
from runtime.backends import fast_paths_mask_empty_slots
from runtime.reader import excerpt
from models import LMN, LMNConfig
from models.checkpoint import DEFAULT_CHECKPOINT, load, sha256
from . import contract, coreml_export, onnx_export
from .conformance_vectors import write_conformance
from .graphs import GraphSpec, step_spec
from .onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportError
from .output_folder import DestinationError, check_destination
from .parity_text import parity_ids
from .predictors import FastPathPredictor, OnnxPredictor
from .quantize import QUANT_BLOCKS, QUANTIZE_CHOICES, export_precision
from .quantize_graph import DEFAULT_QUANT_BLOCK
from .coreml_package import MULTIFUNCTION_TARGET, combine_functions
from .weights_store import store_each_precision
from .validate import (FP16_ATOL, FP32_ATOL, ParityReport, check_names, prefill_from_states, start_pointers,
                       stream_parity, stream_tokens)

log = logging.getLogger(__name__)
TARGETS = ("onnx", "coreml")
DEFAULT_PREFILL_SIZES = (64, 512, 4096)
CORE_ML_TARGETS = ("iOS18", "iOS16")
CORE_ML_MAX_LEVELS = 31  # block sizes 2^i must fit int32
# LMN step graphs for tokens that re-summarize exactly k = 0..3 levels once the memory is full:
# 15 of every 16 tokens (k has probability 2^-(k+1)); the rest use the general step graph.
DEFAULT_FAST_PATHS = 4
MAX_PARITY_TOKENS = 1_000_000  # a parity stream steps each token in PyTorch: minutes at the bound
MAX_FAST_PATHS = 61  # a fast path per level count: max_levels <= 62
MAX_PREFILL = 1 << 16  # prefill graph sizes: a (size, vocab) logits tensor and the slot layout stay in memory
FAST_PATH_REACH_CAP = 4096  # longest stream from pointer 0 the fast-path check runs (max_levels <= 12 reach a fast path;
# deeper memories' fast paths mask their empty slots and apply from pointer 0)


@dataclass
class ExportOptions:
    targets: tuple[str, ...] = ("onnx",)
    precision: str = "fp32"
    quantize: tuple[str, ...] = ()  # any of QUANTIZE_CHOICES: int4 / int8 weight-only (ONNX, Core ML), dynamic-int8 (ONNX)
    quant_block: int = DEFAULT_QUANT_BLOCK  # weights per quantization block (a power of two >= 16)
    opset: int = DEFAULT_OPSET
    stateful: bool = False
    coreml_target: str = "iOS18"  # iOS18: step and prefill as functions of one package; iOS16: a package per graph
    atol: float | None = None
    prefill_sizes: tuple[int, ...] = DEFAULT_PREFILL_SIZES
    fast_paths: int = DEFAULT_FAST_PATHS
    parity_tokens: int = 512
    text: str | None = None
    force: bool = False
    other_cpus: bool = False  # also run the conformance vectors on emulated CPU classes (lmn_export.cpu_check)


@dataclass
class ExportResult:
    directory: Path
    manifest: dict
    reports: list[ParityReport] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports)


class _ParityFailed(Exception):
    """Raised inside the staging folder so that a failed export is never published."""

    def __init__(self, result: "ExportResult"):
        super().__init__("parity failed")
        self.result = result


def whole_in(value, low: int, high: int) -> bool:
    """A whole number (not a bool) in [low, high]."""
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def check_options(options: ExportOptions) -> None:
    """Every option in range before any work: a one-line ExportError that says what is allowed."""
    unknown = set(options.targets) - set(TARGETS)
    if unknown or not options.targets:
        raise ExportError(f"unknown target(s) {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    if isinstance(options.opset, bool) or not isinstance(options.opset, int) or not MIN_OPSET <= options.opset <= MAX_OPSET:
        raise ExportError(f"--opset must be {MIN_OPSET}..{MAX_OPSET} (the torch.onnx exporter writes opset "
                          f"{MIN_OPSET} or newer; onnxruntime here runs up to {MAX_OPSET}), got {options.opset!r}")
    if options.atol is not None and not (math.isfinite(options.atol) and options.atol >= 0):
        raise ExportError(f"--atol must be a finite number >= 0, got {options.atol!r}")
    if not whole_in(options.parity_tokens, 1, MAX_PARITY_TOKENS):
        raise ExportError(f"--parity-tokens must be in 1..{MAX_PARITY_TOKENS:,}, got {excerpt(options.parity_tokens)}")
    if not whole_in(options.fast_paths, 0, MAX_FAST_PATHS):
        raise ExportError(f"--fast-paths must be in 0..{MAX_FAST_PATHS}, got {excerpt(options.fast_paths)}")
    if not isinstance(options.prefill_sizes, (tuple, list)) or not all(whole_in(n, 1, MAX_PREFILL) for n in options.prefill_sizes):
        raise ExportError(f"--prefill sizes must be whole numbers in 1..{MAX_PREFILL:,}, got {excerpt(options.prefill_sizes)}")
    check_quantize(options)


def check_quantize(options: ExportOptions) -> None:
    """--quantize: distinct names from QUANTIZE_CHOICES; --quant-block: one of QUANT_BLOCKS."""
    quantize = options.quantize
    if not isinstance(quantize, (tuple, list)) or not all(isinstance(q, str) for q in quantize):
        raise ExportError(f"--quantize takes names from {', '.join(QUANTIZE_CHOICES)} (a tuple in Python), got {quantize!r}")
    unknown = [q for q in quantize if q not in QUANTIZE_CHOICES]
    if unknown:
        raise ExportError(f"unknown --quantize {', '.join(map(repr, unknown))}; choose from {', '.join(QUANTIZE_CHOICES)}")
    if len(set(quantize)) != len(quantize):
        raise ExportError(f"--quantize names a precision twice ({','.join(quantize)}); give each once")
    if "dynamic-int8" in quantize and "onnx" not in options.targets:
        raise ExportError("--quantize dynamic-int8 applies to ONNX only; add --to onnx (Core ML takes int8 or int4)")
    block = options.quant_block
    if isinstance(block, bool) or not isinstance(block, int) or block not in QUANT_BLOCKS:
        raise ExportError(f"--quant-block must be a power of two >= 16 and <= {QUANT_BLOCKS[-1]} "
                          f"({', '.join(map(str, QUANT_BLOCKS))}: what onnxruntime runs), got {excerpt(block)}")


def check_exportable(model, options: ExportOptions) -> None:
    cfg = model.config
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise ExportError(f"the checkpoint has non-finite weights ({', '.join(bad[:3])}); it cannot be exported: "
                          "re-train (lower --lr) or restore an earlier checkpoint")
    if "coreml" in options.targets and isinstance(cfg, LMNConfig) and cfg.max_levels > CORE_ML_MAX_LEVELS:
        raise ExportError(f"Core ML export supports max_levels <= {CORE_ML_MAX_LEVELS} (int32 block sizes); "
                          f"this model has {cfg.max_levels}")
    if options.precision not in coreml_export.PRECISIONS:
        raise ExportError(f"--precision must be one of {coreml_export.PRECISIONS}")
    if options.precision == "fp16" and "coreml" not in options.targets:
        raise ExportError("--precision fp16 applies to Core ML; add --to coreml (ONNX stays fp32; see --quantize)")
    if options.stateful and "coreml" not in options.targets:
        raise ExportError("--stateful applies to Core ML; add --to coreml")
    if options.coreml_target not in CORE_ML_TARGETS:
        raise ExportError(f"--coreml-target must be one of {', '.join(CORE_ML_TARGETS)}, got {excerpt(options.coreml_target)}")


def export(checkpoint: Path | str | None, out: Path | str, options: ExportOptions, progress=None) -> ExportResult:
    """Export and validate; raises ExportError / ValidationError, or returns the result (check .passed)."""
    progress = progress or (lambda message: log.info(message))
    checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    out = Path(out)
    check_options(options)
    try:
        check_destination(out, options.force)
    except DestinationError as e:
        raise ExportError(str(e)) from None
    model, vocab, meta = load(checkpoint)
    check_exportable(model, options)
    torch.manual_seed(0)
    try:
        if out.parent.is_dir():
            for stale in remove_stale_folders(out):
                progress(f"removed {stale.name}, left by an export that was killed")
        with staged_folder(out) as work:
            result = _export_into(work, model, vocab, checkpoint, options, progress)
            if not result.passed:
                raise _ParityFailed(result)  # leaves the staging folder unpublished, and removes it
    except _ParityFailed as failed:
        return ExportResult(out, failed.result.manifest, failed.result.reports)
    except OSError as e:
        where = e.filename or out
        raise ExportError(f"cannot write the export at {where}: {e.strerror or e}; nothing was changed at {out} "
                          "(free space, fix permissions or choose another --out)") from None
    result.directory = out
    return result


def write_fast_paths(model, directory: Path, count: int, opset: int, progress=lambda message: None) -> list[dict]:
    """Write step graphs for tokens that re-summarize exactly k = 0..count-1 levels; their manifest entries.
    They assume a full memory, or, for a deep one, mask its empty slots (`fast_paths_mask_empty_slots`)."""
    entries = []
    full = not fast_paths_mask_empty_slots(model.config.max_levels)
    for k in range(min(count, model.config.max_levels)):
        name = f"step_levels_{k}.onnx"
        progress(f"exporting ONNX fast-path step graph ({k} summary levels{'' if full else ', empty slots masked'})")
        spec = onnx_export.export_step(model, directory / name, opset, levels=k, full=full)
        entries.append({"name": "step_levels", "levels": k, "target": "onnx",
                        "file": name, "precision": "fp32", "opset": opset, **spec.to_dict()})
    return entries


def fast_path_reach(model, parity_tokens: int) -> int:
    """Tokens the fast-path check streams from pointer 0: past the first fast path (pointer 2^(max_levels-1))
    by 64 tokens, so the hand-over from a filling memory is checked, capped at FAST_PATH_REACH_CAP; fast paths
    that mask the empty slots run from pointer 0, so `parity_tokens` covers them."""
    if fast_paths_mask_empty_slots(model.config.max_levels):
        return parity_tokens
    return max(parity_tokens, min(2 ** (model.config.max_levels - 1) + 64, FAST_PATH_REACH_CAP))


def check_fast_paths(work: Path, model, entries: list[dict], text_ids: list[int], options: ExportOptions,
                     progress) -> list[ParityReport]:
    """Stream each parity row alone (batch 1, as the runtime steps) through the step graph and the fast paths
    `entries`, picked per token; the row from pointer 0 runs into the fast paths."""
    general = OnnxPredictor(work / "model.onnx")
    fast = {}
    for entry in entries:
        fast[entry["levels"]] = OnnxPredictor(work / entry["file"])
    spec = step_spec(model.config)  # every fast path has the step graph's inputs and outputs
    for predictor in fast.values():
        check_names(spec, predictor.input_names, predictor.output_names)
    starts = start_pointers(model, options.parity_tokens)
    reach = fast_path_reach(model, options.parity_tokens)
    tokens = stream_tokens(model, text_ids, reach, len(starts))
    progress(f"checking fast-path parity over {options.parity_tokens} tokens per start pointer ({reach} from 0)")
    reports = []
    for row, pointer in enumerate(starts):
        predictor = FastPathPredictor(general, fast, model.config.max_levels)
        steps = reach if pointer == 0 else options.parity_tokens
        report = stream_parity(model, predictor, spec, tokens[row : row + 1, :steps], [pointer], _atol(options, FP32_ATOL),
                               f"onnx fast paths @{pointer}", predictor.runner)
        report.extra["fast_path_steps"] = {str(k): n for k, n in sorted(predictor.used.items())}
        reports.append(report)
    return reports


def _atol(options: ExportOptions, default: float) -> float:
    """The parity tolerance: --atol when given (0 included), else the default for the precision."""
    return default if options.atol is None else options.atol


# A family of graphs an export builds together (a step, its fast paths, one prefill size, one precision's
# copies): writes them into the work folder and checks them, given the entries built before it; returns their
# manifest entries and parity reports.
Family = Callable[[Path, list[dict]], tuple[list[dict], list[ParityReport]]]


def onnx_entry(name: str, file: str, spec, options: ExportOptions, **extra) -> dict:
    return {"name": name, "target": "onnx", "file": file, "precision": "fp32", "opset": options.opset, **extra,
            **spec.to_dict()}


def coreml_entry(name: str, file: str, spec, precision: str, target: str = "iOS16/macOS13", **extra) -> dict:
    return {"name": name, "target": "coreml", "file": file, "precision": precision, **extra,
            "minimum_deployment_target": target, **spec.to_dict()}


def onnx_families(model, options: ExportOptions, text_ids: list[int], progress) -> list[Family]:
    """The ONNX graphs of an export, in the order they are built: step, fast paths, prefill sizes, then each
    quantized precision's copies of them."""
    atol = _atol(options, FP32_ATOL)
    starts = start_pointers(model, options.parity_tokens)
    is_lmn = isinstance(model, LMN)

    def step(work: Path, _):
        progress("exporting ONNX step graph")
        spec = onnx_export.export_step(model, work / "model.onnx", options.opset)
        predictor = OnnxPredictor(work / "model.onnx")
        check_names(spec, predictor.input_names, predictor.output_names)
        progress(f"checking ONNX step parity over {options.parity_tokens} tokens")
        tokens = stream_tokens(model, text_ids, options.parity_tokens, len(starts))
        report = stream_parity(model, predictor, spec, tokens, starts, atol, "onnx step", predictor.runner)
        return [onnx_entry("step", "model.onnx", spec, options)], [report]

    def fast_paths(work: Path, _):
        entries = write_fast_paths(model, work, options.fast_paths, options.opset, progress)
        return entries, check_fast_paths(work, model, entries, text_ids, options, progress)

    def prefill(size: int):
        def build(work: Path, _):
            name = f"prefill_{size}.onnx"
            progress(f"exporting ONNX prefill graph ({size} tokens)")
            spec = onnx_export.export_prefill(model, work / name, size, options.opset)
            predictor = OnnxPredictor(work / name)
            check_names(spec, predictor.input_names, predictor.output_names)
            progress(f"checking ONNX prefill {size} parity from empty, mid-stream and high-pointer states")
            report = prefill_from_states(model, predictor, spec, text_ids, atol, f"onnx prefill {size}", predictor.runner)
            return [onnx_entry("prefill", name, spec, options, size=size)], [report]
        return build

    def quantized(precision: str):
        def build(work: Path, entries: list[dict]):
            fp32 = [g for g in entries if g["target"] == "onnx" and g["precision"] == "fp32"]
            return export_precision(work, fp32, text_ids, options.parity_tokens, precision, options.quant_block,
                                    model.config.max_levels if is_lmn else 0, progress)
        return build

    families = [step]
    if is_lmn and options.fast_paths:
        families.append(fast_paths)
    if is_lmn:
        families += [prefill(size) for size in options.prefill_sizes]
    # a fixed order of precisions: reproducible
    families += [quantized(p) for p in QUANTIZE_CHOICES if p in options.quantize]
    return families


def coreml_families(model, options: ExportOptions, text_ids: list[int], progress) -> list[Family]:
    """The Core ML graphs of an export: step, prefill sizes, quantized steps, the stateful step."""
    from .coreml_run import load_coreml

    precision, steps, target = options.precision, options.parity_tokens, options.coreml_target
    deployment = coreml_export.DEPLOYMENT[target]
    bound = _atol(options, FP16_ATOL if precision == "fp16" else FP32_ATOL)
    starts = start_pointers(model, steps, 2**31 - 1)  # int32 pointers
    tokens = stream_tokens(model, text_ids, steps, len(starts))

    def step(work: Path, _):
        progress(f"exporting Core ML step graph ({precision})")
        spec = coreml_export.export_step(model, work / "model.mlpackage", precision, target)
        predictor, runner = load_coreml(work / "model.mlpackage")
        progress(f"checking Core ML parity over {steps} tokens with {runner}")
        report = stream_parity(model, predictor, spec, tokens, starts, bound, f"coreml step ({precision})", runner)
        return [coreml_entry("step", "model.mlpackage", spec, precision, deployment)], [report]

    def prefill(size: int):
        def build(work: Path, _):
            name = f"prefill_{size}.mlpackage"
            progress(f"exporting Core ML prefill graph ({size} tokens, {precision})")
            spec = coreml_export.export_prefill(model, work / name, size, precision, target)
            predictor, runner = load_coreml(work / name)
            progress(f"checking Core ML prefill {size} parity with {runner}")
            report = prefill_from_states(model, predictor, spec, text_ids, bound, f"coreml prefill {size} ({precision})",
                                         runner, int_max=2**31 - 1)
            return [coreml_entry("prefill", name, spec, precision, deployment, size=size)], [report]
        return build

    def quantized(work: Path, entries: list[dict]):  # int4 / int8 weight-only copies, each judged against the step
        from .coreml_quantize import export_quantized

        step = next(g for g in entries if g["target"] == "coreml" and g["name"] == "step")
        return export_quantized(model, work, options, work / step["file"], GraphSpec.from_dict(step), text_ids, progress)

    def stateful(work: Path, _):
        progress("exporting Core ML stateful (iOS 18) step graph")
        spec = coreml_export.export_stateful_step(model, work / "model.stateful.mlpackage")
        entry = coreml_entry("step_stateful", "model.stateful.mlpackage", spec, "fp16", "iOS18/macOS15",
                             note="memory is a Core ML StateType (fp16, batch 1) updated in place: no state copy per "
                                  "token, but fp16 memory and no explicit state to save or branch")
        predictor, runner = load_coreml(work / "model.stateful.mlpackage")
        reports = [stream_parity(model, predictor, spec, tokens[:1], [pointer], _atol(options, FP16_ATOL),
                                 f"coreml stateful @{pointer}", runner) for pointer in starts]  # batch 1: a stream per start
        return [entry], reports

    families = [step]
    if isinstance(model, LMN):
        families += [prefill(size) for size in options.prefill_sizes]
    if options.quantize:
        families.append(quantized)
    if options.stateful:
        families.append(stateful)
    return families


def store_onnx_weights(work: Path, graphs: list[dict], options: ExportOptions, progress) -> None:
    """Each precision's ONNX graphs read their weights from one shared file, each tensor stored once (lmn.json
    graph field `weights`)."""
    store_each_precision(work, graphs, progress)


def store_coreml_functions(work: Path, graphs: list[dict], options: ExportOptions, progress) -> None:
    """iOS 18: the step and prefill graphs become the functions of one package, their shared weights stored once
    (lmn.json graph field `function`); iOS 16 keeps a package per graph."""
    if options.coreml_target == MULTIFUNCTION_TARGET:
        combine_functions(work, [g for g in graphs if g["name"] in ("step", "prefill") and g["precision"] == options.precision],
                          progress)


PLANS = {"onnx": onnx_families, "coreml": coreml_families}  # per target: the graph families it builds
STORES = {"onnx": store_onnx_weights, "coreml": store_coreml_functions}  # per target: how its checked graphs are stored


def _export_into(work: Path, model, vocab, checkpoint: Path, options: ExportOptions, progress) -> ExportResult:
    """Build every family of graphs (each written and checked), store each target's graphs with one copy of the
    weights (STORES), write the manifest, then, if every check passed, the conformance vectors and the manifest
    that lists them."""
    cfg = model.config
    text_ids, text_source = parity_ids(model, vocab, options.parity_tokens, options.text)
    graphs, reports = [], []
    for target in (t for t in TARGETS if t in options.targets):
        for build in PLANS[target](model, options, text_ids, progress):
            entries, judged = build(work, graphs)
            graphs += entries
            reports += judged
    for target in (t for t in TARGETS if t in options.targets):
        STORES[target](work, [g for g in graphs if g["target"] == target], options, progress)

    def manifest(conformance: dict | None = None) -> dict:
        return contract.build_manifest(
            work, cfg.to_dict(), vocab.kind, "".join(vocab.chars) if vocab.kind == "chars" else None, graphs,
            validated_ranges(reports), source={"checkpoint": checkpoint.name, "sha256": sha256(checkpoint)},
            parity={"text": text_source, "reports": [r.to_dict() for r in reports]}, conformance=conformance)

    final = manifest()
    contract.write_manifest(work, final)  # the conformance stage loads the folder through the runtime
    if "onnx" in options.targets and all(r.passed for r in reports):  # vectors only from graphs that passed
        final = manifest(write_conformance(work, text_ids, progress, options.other_cpus))
        contract.write_manifest(work, final)
    return ExportResult(work, final, reports)


def validated_ranges(reports: list[ParityReport]) -> list[tuple[int, int, str]]:
    """The input-pointer ranges the parity streams stepped through: (first, last, graphs)."""
    return [(start, start + report.tokens - 1, report.graph) for report in reports if "prefill" not in report.graph
            for start in report.start_pointers]
