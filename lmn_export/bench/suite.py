"""One run of the benchmark: the sections asked for, then their headline numbers."""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

import runtime

from .baselines import build_baselines
from .decode import bench_gpt, bench_lmn, bench_ttft
from .decode_speed import bench_decode_speed
from .footprint import bench_footprint
from .prefill import bench_prefill
from .quality import GPT_CHECKPOINT, bench_quality, text_ids, trained_gpt_export
from .reach import bench_reach
from .recall import bench_recall
from .settings import NO_EXPORT_SECTIONS, Settings, gpt_positions
from .speed_goals import goal_results, speed_summary
from .timing import cycle, time_steps
from .train import bench_train, train_ratios


def machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": ort.__version__}


def run(lmn_dir: Path | None, s: Settings, log=print) -> dict:
    """Every section in `s.sections`; the export is loaded only for the sections that time it."""
    result = {"machine": machine(), "settings": dataclasses.asdict(s)}
    if set(s.sections) - set(NO_EXPORT_SECTIONS):
        run_export_sections(lmn_dir, s, result, log)
    if "reach" in s.sections:
        result["reach"] = bench_reach(s.reach, log)
    if "recall" in s.sections:
        result["recall"] = bench_recall(s.recall, log)
    if "train" in s.sections:
        log("training throughput")
        result["train"] = bench_train(s.train, s.threads, s.seed, log)
    result["summary"] = summarize(result)
    return result


def run_export_sections(lmn_dir: Path | None, s: Settings, result: dict, log) -> None:
    """The sections that time an LMN export (decode, ttft, speed, quality), into `result`."""
    sections = set(s.sections)
    model = runtime.load(lmn_dir, threads=s.threads)
    if model.config.get("arch", "lmn") != "lmn":
        raise runtime.ManifestError(f"{model.directory} holds a {model.config['arch']} export; lmn-bench times an LMN "
                                    "export against its own GPT-2 baseline: give an LMN export folder")
    drive, val, source = text_ids(model.vocab, s.quality_chars)
    span = s.warmup + s.tokens * s.reps
    result.update({"text": source, "lmn": {"config": model.config, "state_bytes": model.state_bytes,
                                           "files": model.manifest.data["files"]}})
    if sections & {"decode", "ttft"}:
        with tempfile.TemporaryDirectory() as tmp:
            gpt_dir, gcfg, bare_dir = build_baselines(model.config, gpt_positions(s), Path(tmp), log)
            if "decode" in sections:
                decode = bench_lmn(model, drive, s, log)
                decode += bench_gpt(gpt_dir, gcfg, s.contexts, s, log)
                bare = runtime.load(bare_dir, threads=s.threads).stepper()
                log("LMN without memory: timing")
                bare_timing = time_steps(bare.step, cycle(drive, span), s.reps, s.warmup).summary()
                result["decode"] = decode
                result["no_memory"] = bare_timing
                lmn_1k = next(r for r in decode if r["model"] == "lmn")
                result["memory_overhead_ratio"] = lmn_1k["p50_us"] / bare_timing["p50_us"]
            if "ttft" in sections:
                log("time to first token")
                result["ttft"] = bench_ttft(model, gpt_dir, gcfg, drive, s)
    if "prefill" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            result["prefill"] = bench_prefill(model.directory, drive, s.prefill, s.threads, Path(tmp), log)
    if "speed" in sections and s.speed.presets:
        with tempfile.TemporaryDirectory() as tmp:
            result["decode_speed"] = bench_decode_speed(model.directory, drive, dataclasses.replace(s.speed, threads=s.threads),
                                                        Path(tmp), log)
        shipped = next((row for row in result["decode_speed"] if row["weights"].startswith("shipped")), None)
        if shipped and "decode" in sections:  # interleaved with the memory-free model: robust to slow phases
            result["memory_overhead_ratio_sequential"] = result["memory_overhead_ratio"]
            result["memory_overhead_ratio"] = shipped["ratio_p50_vs_no_memory"]
    if "quality" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            gpt = trained_gpt_export(Path(tmp), log) if GPT_CHECKPOINT.is_dir() and val else None
            result["quality"] = bench_quality(model, gpt, val, log)
    if "footprint" in sections:
        result["footprint"] = bench_footprint(model, s.threads, log)


def summarize(r: dict) -> dict:
    """The headline numbers of the sections that ran."""
    out = {}
    decode = r.get("decode", [])
    lmn = {row["n_ctx"]: row for row in decode if row["model"] == "lmn"}
    inplace = {row["n_ctx"]: row for row in decode if row["layout"] == "kv-inplace"}
    concat = {row["n_ctx"]: row for row in decode if row["layout"] == "kv-concat"}
    if lmn:
        first, last = min(lmn), max(lmn)
        out = {"lmn_tps_ratio_longest_vs_first": lmn[last]["tokens_per_s"] / lmn[first]["tokens_per_s"],
               "lmn_contexts": [first, last],
               "lmn_state_bytes_constant": len({row["state_bytes"] for row in lmn.values()}) == 1,
               "memory_overhead_ratio": r["memory_overhead_ratio"]}
    if r.get("decode_speed"):
        out["speed"] = speed_summary(r["decode_speed"])
        out["speed_goals"] = goal_results(out["speed"])
    common = max(set(lmn) & set(inplace)) if set(lmn) & set(inplace) else None
    if common:
        out["at_context"] = common
        out["speedup_vs_kv_inplace"] = inplace[common]["p50_us"] / lmn[common]["p50_us"]
        out["speedup_vs_kv_concat"] = concat[common]["p50_us"] / lmn[common]["p50_us"]
        out["state_ratio_vs_kv"] = inplace[common]["state_bytes"] / lmn[common]["state_bytes"]
    if r.get("prefill"):
        out["prefill"] = [{"model": row["model"], "n_embd": row["n_embd"],
                           "break_even_tokens": row["break_even"]["break_even_tokens"],
                           "second_vs_first": row["second_turn"]["second_vs_first"],
                           "second_vs_stepping": row["second_turn"]["second_vs_stepping"],
                           "goals_met": all(g["met"] for g in row["second_turn"]["goals"].values())}
                          for row in r["prefill"]]
    if r.get("footprint"):
        out["footprint"] = {row["precision"]: {key: round(row[key], 3) for key in ("files_vs_weights", "rss_vs_weights_and_state")}
                            for row in r["footprint"]}
    if r.get("reach"):
        out["reach_bpc_by_bin"] = {row["checkpoint"]: [round(b["bpc"], 4) for b in row["bins"]] for row in r["reach"]}
    if r.get("recall"):
        out["recall_by_distance"] = {row["checkpoint"]: {e["distance"]: e["accuracy"] for e in row["by_distance"]}
                                     for row in r["recall"]}
    if r.get("train"):
        out["train_ratio"] = train_ratios(r["train"])
    return out


