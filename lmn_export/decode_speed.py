"""Decode speed of the LMN step per model size: step-graph variants timed side by side in one run.

For each preset: the general step graph alone (every level computed, selected per row), the
runtime's fast paths (`step_levels_k`, picked per token), their int8 copies, and the same model
with its memory removed (max_levels 1, same code), plus the Python cost of the runtime's stepper
and an onnxruntime profile of the most frequent graph. LogMem-32 uses the export being benchmarked;
other presets are exported here with random weights (timing does not depend on the weights).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

import runtime
from runtime.backends import OnnxStepper, empty_state, fast_path_levels

NO_MEMORY = "no memory"
NO_MEMORY_INT8 = "no memory int8"
EXPORT_PRESET = "export"  # not a preset: the export being benchmarked, its own config and weights (nothing re-exported)


def preset_names() -> tuple[str, ...]:
    """What the decode-speed section accepts: `export` and every LMN preset."""
    from models.config import PRESETS, LMNConfig

    return (EXPORT_PRESET, *(name for name, cfg in PRESETS.items() if isinstance(cfg, LMNConfig)))


@dataclasses.dataclass
class SpeedSettings:
    presets: tuple[str, ...] = ("logmem-32", "logmem-128")
    tokens: int = 500  # timed tokens per variant per round
    rounds: int = 5  # variants interleaved, round after round
    fill: int = 600  # tokens stepped before timing, so the memory is full (fast paths apply)
    threads: int = 1


def export_preset(name: str, work: Path, vocab_size: int, log) -> Path:
    """A random-weight export of a preset with the same step graphs as `lmn-export --quantize int8`."""
    import torch

    from models import LMN
    from models.config import preset
    from . import onnx_export
    from .export import DEFAULT_FAST_PATHS, write_fast_paths

    torch.manual_seed(0)
    model = LMN(preset(name, vocab_size)).eval()
    out = work / name
    out.mkdir()
    log(f"{name}: exporting random-weight step graphs (general, fast paths, int8)")
    spec = onnx_export.export_step(model, out / "model.onnx")
    graphs = [{"name": "step", "target": "onnx", "file": "model.onnx", **spec.to_dict()}]
    graphs += write_fast_paths(model, out, DEFAULT_FAST_PATHS, onnx_export.DEFAULT_OPSET, spec)
    return write_step_export(out, model.config, graphs)


def export_no_memory(config: dict, work: Path, log) -> Path:
    """The same model with its memory removed (max_levels 1), fp32 and int8, as an export folder."""
    import torch

    from models import LMN, LMNConfig
    from . import onnx_export

    torch.manual_seed(0)
    fields = {f.name for f in dataclasses.fields(LMNConfig)}
    cfg = LMNConfig(**{**{k: v for k, v in config.items() if k in fields}, "max_levels": 1})
    out = work / f"no-memory-{cfg.n_embd}"
    out.mkdir()
    log(f"E={cfg.n_embd}: exporting the memory-free model")
    spec = onnx_export.export_step(LMN(cfg).eval(), out / "model.onnx").to_dict()
    return write_step_export(out, cfg, [{"name": "step", "target": "onnx", "file": "model.onnx", **spec}])


def write_step_export(out: Path, cfg, graphs: list[dict]) -> Path:
    """Add an int8 copy of every graph and a minimal manifest the runtime loads (no parity: timing only)."""
    from runtime import manifest as schema
    from runtime.atomic import write_atomic

    from .quantize import write_quantized_copy

    graphs = graphs + [write_quantized_copy(out, g, "dynamic-int8") for g in graphs]
    files = {g["file"]: {"sha256": schema.file_digest(out / g["file"]), "bytes": schema.file_size(out / g["file"])}
             for g in graphs}
    vocab = "".join(chr(32 + i) for i in range(cfg.vocab_size))
    data = {"format": schema.FORMAT, "format_version": schema.FORMAT_VERSION, "model": cfg.to_dict(), "vocab": vocab,
            "state_bytes_per_stream": 0, "graphs": graphs, "files": files}
    write_atomic(out / schema.MANIFEST, json.dumps(schema.seal(data), indent=2, allow_nan=False))
    return out


def steppers(directory: Path, threads: int) -> dict[str, OnnxStepper]:
    """One stepper per variant the export folder holds, built by the runtime as for a stream."""
    fp32 = runtime.load(directory, threads=threads)
    out = {"general": OnnxStepper(fp32.session, fp32.step_graph)}
    if fp32.fast_paths:
        out["fast paths"] = fp32.stepper()
    if "dynamic-int8" in fp32.manifest.precisions():
        int8 = runtime.load(directory, threads=threads, precision="dynamic-int8")
        if int8.fast_paths:
            out["fast paths int8"] = int8.stepper()
    return out


def time_interleaved(steps: dict[str, OnnxStepper], drive: list[int], s: SpeedSettings) -> dict[str, dict]:
    """Each variant steps the same text; variants alternate every `tokens` tokens for `rounds` rounds."""
    for stepper in steps.values():
        for t in drive[: s.fill]:
            stepper.step(t)
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
                     "n_tokens": int(flat.size)}
    return out


def python_overhead_us(stepper: OnnxStepper, pointer: int, n: int = 2000) -> dict:
    """Per-token cost of the runtime's stepper around onnxruntime: `stepper.step` vs a bare
    `run_with_iobinding` of the graph it picks, both holding the state at `pointer` (timing only)."""
    stepper.current = 0
    stepper.buffers[0]["pointer"][0] = pointer
    levels = fast_path_levels(pointer, stepper.max_levels) if stepper.fast else None
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
    return {"nodes_per_run": sum(count.values()) / runs,
            "ops": [{"op": op, "share": us / grand, "nodes": count[op] // runs, "us_per_run": us / runs}
                    for op, us in total.most_common()]}


def bench_decode_speed(shipped: Path, drive: list[int], s: SpeedSettings, work: Path, log) -> list[dict]:
    """Rows: per preset, the timing of every variant and the ratios the decode-speed goal names."""
    from models.config import preset

    shipped_config = runtime.read_manifest(shipped).model
    rows = []
    for name in s.presets:
        cfg = dict(shipped_config) if name == EXPORT_PRESET else preset(name, shipped_config["vocab_size"]).to_dict()
        same = {k: cfg[k] for k in cfg if k != "vocab_size"} == {k: shipped_config[k] for k in cfg if k != "vocab_size"}
        directory = shipped if same else export_preset(name, work, shipped_config["vocab_size"], log)
        bare_dir = export_no_memory(cfg, work, log)
        steps = steppers(directory, s.threads)
        bare = steppers(bare_dir, s.threads)
        steps[NO_MEMORY] = bare["general"]
        int8 = runtime.load(bare_dir, threads=s.threads, precision="dynamic-int8")
        steps[NO_MEMORY_INT8] = OnnxStepper(int8.session, int8.step_graph)
        log(f"{name}: timing {', '.join(steps)} ({s.rounds} rounds x {s.tokens} tokens each)")
        timings = time_interleaved(steps, drive, s)
        pointer = (1 << cfg["max_levels"]) - 2 + 2 * 1024  # memory full, pointer+1 odd: 0 summary levels
        fast = timings.get("fast paths", timings["general"])
        row = {"preset": name, "weights": "shipped" if same else "random", "config": cfg, "variants": timings,
               "ratio_p50_vs_no_memory": fast["p50_us"] / timings[NO_MEMORY]["p50_us"],
               "ratio_mean_vs_no_memory": fast["mean_us"] / timings[NO_MEMORY]["mean_us"],
               "python": python_overhead_us(steps.get("fast paths", steps["general"]), pointer)}
        if "fast paths int8" in timings:
            row["ratio_int8_p50_vs_no_memory_int8"] = timings["fast paths int8"]["p50_us"] / timings[NO_MEMORY_INT8]["p50_us"]
        level0 = runtime.read_manifest(directory).graph("step_levels")
        if level0 is not None:
            row["profile_levels_0"] = profile_graph(directory, level0, pointer)
        rows.append(row)
    return rows
