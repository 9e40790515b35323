"""Decode speed of the LMN step per model size and precision, timed side by side in one run, against
the bandwidth floor (`floor.py`) and against the same model without its memory.

For each preset and precision (fp32; int8 and int4 weight-only MatMulNBits; dynamic-int8 if asked):
the runtime's stepper with its fast paths (`step_levels_k`, picked per token) and the memory-free
twin (max_levels 1, same code, its step graph) at that precision; the fp32 general step graph alone
(every level computed, selected per row); the Python cost of the runtime's stepper; and an
onnxruntime profile of the 0-level fast path per precision. The export being benchmarked is timed
as it is when its config matches the preset and it holds every precision asked for; otherwise the
preset is exported here with random weights (timing does not depend on the weights).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

import runtime
from runtime.backends import OnnxStepper, empty_state

from .floor import bytes_per_token, floor_fields, read_bandwidth

EXPORT_PRESET = "export"  # not a preset: the export being benchmarked, its own config and weights
PRECISIONS = ("fp32", "int8", "int4", "dynamic-int8")  # what --speed-precisions accepts, in the order they run
DEFAULT_PRECISIONS = ("fp32", "int8", "int4")
GENERAL = "general fp32"


def fast(precision: str) -> str:
    """The variant name of the LMN's fast-path stepper at a precision."""
    return f"fast paths {precision}"


def no_memory(precision: str) -> str:
    """The variant name of the memory-free twin at a precision."""
    return f"no memory {precision}"


def preset_names() -> tuple[str, ...]:
    """What the decode-speed section accepts: `export` and every LMN preset (each also as NAME@LEVELS)."""
    from models.config import PRESETS, LMNConfig

    return (EXPORT_PRESET, *(name for name, cfg in PRESETS.items() if isinstance(cfg, LMNConfig)))


def preset_config(name: str, vocab_size: int):
    """The config of a preset name, or of NAME@LEVELS: that preset with `max_levels` = LEVELS."""
    import dataclasses as dc

    from models.config import preset

    base, _, levels = name.partition("@")
    cfg = preset(base, vocab_size)
    return dc.replace(cfg, max_levels=int(levels)) if levels else cfg


@dataclasses.dataclass
class SpeedSettings:
    presets: tuple[str, ...] = ("logmem-32", "logmem-128", "logmem-512")
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    tokens: int = 500  # timed tokens per variant per round
    rounds: int = 5  # variants interleaved, round after round
    fill: int = 600  # tokens stepped before timing, so the memory is full (fast paths apply)
    threads: int = 1


def export_preset(name: str, work: Path, vocab_size: int, precisions: tuple[str, ...], log,
                  prefill_sizes: tuple[int, ...] = ()) -> Path:
    """A random-weight export of a preset: the step graph and fast paths (and prefill graphs of
    `prefill_sizes`), at every precision, in work/name (work/prefill-name with prefill graphs)."""
    import torch

    from models import LMN

    from .. import onnx_export
    from ..export import DEFAULT_FAST_PATHS, write_fast_paths

    torch.manual_seed(0)
    model = LMN(preset_config(name, vocab_size)).eval()
    out = work / (f"prefill-{name}" if prefill_sizes else name)
    out.mkdir()
    extra = f", prefill {', '.join(map(str, prefill_sizes))}" if prefill_sizes else ""
    log(f"{name}: exporting random-weight step graphs (general, fast paths{extra}) at {', '.join(precisions)}")
    spec = onnx_export.export_step(model, out / "model.onnx")
    graphs = [{"name": "step", "target": "onnx", "file": "model.onnx", "precision": "fp32", **spec.to_dict()}]
    graphs += write_fast_paths(model, out, DEFAULT_FAST_PATHS, onnx_export.DEFAULT_OPSET)
    for size in prefill_sizes:
        pspec = onnx_export.export_prefill(model, out / f"prefill_{size}.onnx", size)
        graphs.append({"name": "prefill", "target": "onnx", "file": f"prefill_{size}.onnx", "precision": "fp32",
                       "size": size, **pspec.to_dict()})
    return write_step_export(out, model.config, graphs, precisions)


def requantize_export(shipped: runtime.ExportedModel, work: Path, precisions: tuple[str, ...], log) -> Path:
    """The export's fp32 step and fast-path graphs copied into `work`, with every precision made
    here (plain round-to-nearest, no gate repair): for an export that lacks some of them."""
    import onnx

    from models.config import config_from_dict

    out = work / "export"
    out.mkdir()
    log(f"export: quantizing its step graphs to {', '.join(p for p in precisions if p != 'fp32')} (timing only)")
    graphs = [shipped.step_graph, *shipped.fast_path_graphs.values()]
    for g in graphs:  # with their weights embedded, as the quantizers read them; stored once again below
        onnx.save(onnx.load(str(shipped.directory / g["file"])), str(out / g["file"]))
    return write_step_export(out, config_from_dict(shipped.config), graphs, precisions)


def export_no_memory(config: dict, work: Path, precisions: tuple[str, ...], log) -> Path:
    """The same model with its memory removed (max_levels 1), its step graph at every precision (made once per
    width: presets that differ only in their levels share it)."""
    import torch

    from models import LMN, LMNConfig

    from .. import onnx_export

    torch.manual_seed(0)
    fields = {f.name for f in dataclasses.fields(LMNConfig)}
    cfg = LMNConfig(**{**{k: v for k, v in config.items() if k in fields}, "max_levels": 1})
    out = work / f"no-memory-{cfg.n_embd}"
    if out.is_dir():
        return out
    out.mkdir()
    log(f"E={cfg.n_embd}: exporting the memory-free model")
    spec = onnx_export.export_step(LMN(cfg).eval(), out / "model.onnx").to_dict()
    return write_step_export(out, cfg, [{"name": "step", "target": "onnx", "file": "model.onnx", "precision": "fp32",
                                         **spec}], precisions)


def write_step_export(out: Path, cfg, graphs: list[dict], precisions: tuple[str, ...]) -> Path:
    """Add a copy of every fp32 graph at each other precision, and a minimal manifest the runtime
    loads (no parity: timing only). The one place the benchmark writes a manifest."""
    from .. import contract
    from ..quantize_graph import write_quantized_copy
    from ..weights_store import store_each_precision

    graphs = graphs + [write_quantized_copy(out, g, p) for p in precisions if p != "fp32" for g in graphs]
    store_each_precision(out, graphs)  # as lmn-export stores them
    vocab = "".join(chr(32 + i) for i in range(cfg.vocab_size))  # random weights: any characters will do
    contract.write_manifest(out, contract.build_manifest(out, cfg.to_dict(), "chars", vocab, graphs, validated=[]))
    return out


def stepper_files(model: runtime.ExportedModel) -> list[str]:
    """The graph files a stepper of this loaded model may run: its step graph and fast paths."""
    return [model.step_graph["file"], *(g["file"] for g in model.fast_path_graphs.values())]


def steppers(directory: Path, precisions: tuple[str, ...], threads: int) -> tuple[dict[str, OnnxStepper], dict[str, list[str]]]:
    """Per variant, a stepper built by the runtime as for a stream: the fp32 general step graph
    alone, and at each precision the stepper with its fast paths. Also the graph files each precision
    loads (for file sizes)."""
    out, files = {}, {}
    for precision in precisions:
        model = runtime.load(directory, threads=threads, precision=precision)
        if precision == "fp32":
            out[GENERAL] = OnnxStepper(model.session, model.step_graph)
        out[fast(precision)] = model.stepper()
        files[precision] = stepper_files(model)
    return out, files


def time_interleaved(steps: dict[str, OnnxStepper], drive: list[int], s: SpeedSettings) -> dict[str, dict]:
    """Each variant steps the same text; variants alternate every `tokens` tokens for `rounds` rounds.
    `calls`: how often each graph file ran in the timed steps."""
    for stepper in steps.values():
        for t in drive[: s.fill]:
            stepper.step(t)
        stepper.calls.clear()
    samples = {name: [] for name in steps}
    clock = time.perf_counter_ns
    for r in range(s.rounds):
        chunk = drive[s.fill + r * s.tokens: s.fill + (r + 1) * s.tokens]
        for name, stepper in steps.items():
            lat = []
            for t in chunk:
                began = clock()
                stepper.step(t)
                lat.append((clock() - began) / 1e3)
            samples[name].append(lat)
    out = {}
    for name, reps in samples.items():
        flat = np.concatenate(reps)
        out[name] = {"p50_us": float(np.median(flat)), "mean_us": float(flat.mean()),
                     "p99_us": float(np.percentile(flat, 99)), "round_p50_us": [float(np.median(x)) for x in reps],
                     "n_tokens": int(flat.size), "calls": dict(steps[name].calls)}
    return out


def python_overhead_us(stepper: OnnxStepper, pointer: int, n: int = 2000) -> dict:
    """Per-token cost of the runtime's stepper around onnxruntime: `stepper.step` vs a bare
    `run_with_iobinding` of the graph it picks, both holding the state at `pointer` (timing only)."""
    stepper.current = 0
    stepper.buffers[0]["pointer"][0] = pointer
    levels = stepper.rule.levels(pointer) if stepper.fast else None
    session, binding, _ = stepper.fast.get(levels, stepper.bindings)[0]

    def bare() -> None:
        session.run_with_iobinding(binding)

    def wrapped() -> None:
        stepper.step(5)
        stepper.current = 0  # read the same buffers again

    results = {}
    for name, fn in (("bare_run_us", bare), ("stepper_step_us", wrapped)):
        for _ in range(200):
            fn()
        lat = []
        for _ in range(n):
            began = time.perf_counter_ns()
            fn()
            lat.append((time.perf_counter_ns() - began) / 1e3)
        results[name] = float(np.median(lat))
    results["overhead_us"] = results["stepper_step_us"] - results["bare_run_us"]
    return results


def profile_graph(directory: Path, graph: dict, pointer: int, runs: int = 500) -> dict:
    """onnxruntime's profiler on one step graph: kernel microseconds per run by operator type.

    Profiling adds a fixed cost per node, so read the shares and counts, not the absolute total.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    session = ort.InferenceSession(str(directory / graph["file"]), options, providers=["CPUExecutionProvider"])
    shape = empty_state(graph)["memory"].shape  # the graph's own state layout, batch 1
    memory = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {"token": np.array([1], dtype=np.int64), "memory": memory, "pointer": np.array([pointer], dtype=np.int64)}
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    grand = sum(total.values())
    return {"file": graph["file"], "nodes_per_run": sum(count.values()) / runs, "kernel_us_per_run": grand / runs,
            "ops": [{"op": op, "share": us / grand, "nodes": count[op] // runs, "us_per_run": us / runs}
                    for op, us in total.most_common()]}


def timed_folder(name: str, cfg: dict, shipped: runtime.ExportedModel, precisions: tuple[str, ...], work: Path,
                 log) -> tuple[Path, str]:
    """The export folder a preset is timed from, and whose weights it holds."""

    mine = {k: v for k, v in cfg.items() if k != "vocab_size"}
    same = mine == {k: shipped.config.get(k) for k in mine}
    if not same:
        return export_preset(name, work, shipped.config["vocab_size"], precisions, log), "random"
    if set(precisions) <= set(shipped.manifest.precisions("onnx")):
        return shipped.directory, "shipped"
    return requantize_export(shipped, work, precisions, log), "shipped, quantized here"


def precision_figures(timings: dict, precision: str, directory: Path, bare_dir: Path, files: dict) -> dict:
    """summary.speed[preset][precision]: time, the bytes one token reads and their floor, the
    memory-free twin, the files (the step graphs and their weights file)."""
    lmn, bare = timings[fast(precision)], timings[no_memory(precision)]
    weight_bytes = bytes_per_token(collections.Counter(lmn["calls"]), directory)
    row = {"p50_us": lmn["p50_us"], "mean_us": lmn["mean_us"],
           **floor_fields(lmn["mean_us"], weight_bytes, read_bandwidth(weight_bytes)),
           "no_memory_mean_us": bare["mean_us"], "ratio_vs_no_memory_mean": lmn["mean_us"] / bare["mean_us"],
           "file_bytes": sum((directory / f).stat().st_size for f in with_weights(
               runtime.read_manifest(directory, verify_files=False).data["graphs"], files[precision]))}
    return row


def with_weights(graphs: list[dict], files) -> set[str]:
    """Graph `files` and the weights files they read (the manifest `graphs`' field `weights`)."""
    return set(files) | {g["weights"] for g in graphs if g["file"] in files and "weights" in g}


def bench_decode_speed(shipped_dir: Path, drive: list[int], s: SpeedSettings, work: Path, log) -> list[dict]:
    """Rows: per preset, the timing of every variant, and per precision the figures of
    `precision_figures` (the floor measured right after the timing, in the same process)."""
    shipped = runtime.load(shipped_dir, threads=s.threads)
    rows = []
    for name in s.presets:
        cfg = dict(shipped.config) if name == EXPORT_PRESET else preset_config(name, shipped.config["vocab_size"]).to_dict()
        directory, weights = timed_folder(name, cfg, shipped, s.precisions, work, log)
        bare_dir = export_no_memory(cfg, work, s.precisions, log)
        steps, files = steppers(directory, s.precisions, s.threads)
        bare, _ = steppers(bare_dir, s.precisions, s.threads)
        steps.update({no_memory(p): bare[fast(p)] for p in s.precisions})
        log(f"{name}: timing {len(steps)} variants ({s.rounds} rounds x {s.tokens} tokens each)")
        timings = time_interleaved(steps, drive, s)
        log(f"{name}: measuring the read bandwidth of this machine at each precision's weight bytes")
        precisions = {p: precision_figures(timings, p, directory, bare_dir, files) for p in s.precisions}
        pointer = (1 << cfg["max_levels"]) - 2 + 2 * 1024  # memory full, pointer+1 odd: 0 summary levels
        ratio = {f"ratio_{k}_vs_no_memory": timings[fast("fp32")][f"{k}_us"] / timings[no_memory("fp32")][f"{k}_us"]
                 if "fp32" in s.precisions else None for k in ("p50", "mean")}
        row = {"preset": name, "weights": weights, "config": cfg, "variants": timings, "precisions": precisions, **ratio,
               "python": python_overhead_us(steps[fast("fp32")], pointer) if "fp32" in s.precisions else None,
               "profile_levels_0": {}}
        manifest = runtime.read_manifest(directory)
        for p in s.precisions:
            level0 = manifest.graph("step_levels", "onnx", p)
            if level0 is not None:
                log(f"{name}: profiling the 0-level fast path, {p}")
                row["profile_levels_0"][p] = profile_graph(directory, level0, pointer, runs=200)
        rows.append(row)
    return rows
