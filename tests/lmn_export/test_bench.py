"""lmn-bench's own logic and its command line on tiny models (timings are only bounded, never compared)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import runtime
from lmn_export.bench import command, report
from lmn_export.bench.baselines import KVConcatStepper, KVRowsStepper, session
from lmn_export.bench.command import main, parse_contexts, parse_precisions, parse_presets, parse_sections
from lmn_export.bench.decode_speed import (SpeedSettings, export_no_memory, fast, no_memory, profile_graph,
                                           python_overhead_us, steppers, time_interleaved)
from lmn_export.bench.footprint import bench_footprint, measure_loaded, weight_bytes
from lmn_export.bench.floor import (MIN_READ_BYTES, ReadCheckError, bytes_per_token, floor_fields, initializer_bytes,
                                    read_bandwidth)
from lmn_export.bench.report import finite_json, results_json
from lmn_export.bench.prefill import PrefillSettings
from lmn_export.bench.settings import SECTIONS, Settings, gpt_positions
from lmn_export.bench.speed_goals import FIELDS, goal_results
from lmn_export.bench.suite import run, summarize
from lmn_export.bench.timing import Timing
from lmn_export.bench.train import train_block
from lmn_export.onnx_export import export_kv_layout
from models import GPT, GPTConfig
from models.config import preset
from runtime.atomic import TEMP_MARK


def test_timing_summary():
    t = Timing([[10.0, 20.0, 30.0], [10.0, 10.0, 100.0]])
    s = t.summary()
    assert s["p50_us"] == 15.0 and s["n_tokens"] == 6
    assert s["rep_median_us_min"] == 10.0 and s["rep_median_us_max"] == 20.0
    assert s["tokens_per_s"] == pytest.approx(1e6 / 30.0)


def test_kv_steppers_match_the_model(tmp_path):
    """The in-place and concat baselines decode exactly what GPT.step decodes."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=2, block_size=64)
    model = GPT(cfg).eval()
    export_kv_layout(model, tmp_path / "rows.onnx", "rows")
    export_kv_layout(model, tmp_path / "concat.onnx", "concat")
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        state, want = model.init_state(1), []
        for t in tokens:
            logits, state = model.step(torch.tensor([t]), state)
            want.append(logits[0].numpy())
    rows = KVRowsStepper(session(tmp_path / "rows.onnx", 1), cfg.to_dict(), capacity=16)
    got_rows = [rows.step(t).copy() for t in tokens]
    np.testing.assert_allclose(got_rows, want, atol=1e-5)
    assert rows.state_bytes == 2 * 2 * 2 * 8 * 4 * len(tokens) + 8
    concat = KVConcatStepper(session(tmp_path / "concat.onnx", 1), cfg.to_dict())
    concat.past = [np.asarray(state.keys[:, :, :, :1]) * 0] * 2  # one zero row stands in for "empty"
    assert concat.step(tokens[0]).shape == (11,)


def test_summary_ratios():
    decode = [
        {"model": "lmn", "layout": "memory", "n_ctx": 1024, "p50_us": 10.0, "tokens_per_s": 100.0, "state_bytes": 50},
        {"model": "lmn", "layout": "memory", "n_ctx": 4096, "p50_us": 10.0, "tokens_per_s": 98.0, "state_bytes": 50},
        {"model": "gpt2", "layout": "kv-inplace", "n_ctx": 4096, "p50_us": 1000.0, "tokens_per_s": 1.0, "state_bytes": 50_000},
        {"model": "gpt2", "layout": "kv-concat", "n_ctx": 4096, "p50_us": 3000.0, "tokens_per_s": 1.0, "state_bytes": 50_000},
    ]
    s = summarize({"decode": decode, "memory_overhead_ratio": 1.2})
    assert s["lmn_tps_ratio_longest_vs_first"] == pytest.approx(0.98)
    assert s["at_context"] == 4096 and s["speedup_vs_kv_inplace"] == 100 and s["speedup_vs_kv_concat"] == 300
    assert s["state_ratio_vs_kv"] == 1000 and s["lmn_state_bytes_constant"]


def test_run_end_to_end_on_a_tiny_export(export_dir, tmp_path):
    # prompt 100 > context 64 + the 12 tokens stepped after it: the GPT-2 baseline must still hold it
    # (it was sized from the contexts alone, and `--contexts 1024` crashed in the time-to-first-token test)
    s = Settings(contexts=(64,), lmn_only_contexts=(256,), tokens=5, reps=2, warmup=2, prompts=(16, 100),
                 quality_chars=200, speed=SpeedSettings(presets=()),
                 prefill=PrefillSettings(history=50, turn=40, lengths=(1, 20), from_pointer=7, presets=(), reps=1))
    assert gpt_positions(s) == 101
    result = run(export_dir, s, log=lambda m: None)
    lmn = [r for r in result["decode"] if r["model"] == "lmn"]
    assert [r["n_ctx"] for r in lmn] == [64, 256] and len({r["state_bytes"] for r in lmn}) == 1
    assert {r["layout"] for r in result["decode"]} == {"memory", "kv-inplace", "kv-concat"}
    gpt = [r for r in result["decode"] if r["layout"] == "kv-inplace"]
    assert gpt[0]["state_bytes"] > lmn[0]["state_bytes"]
    assert result["memory_overhead_ratio"] > 0 and {r["variant"] for r in result["ttft"]} >= {"lmn prefill"}
    assert {(r["variant"], r["prompt_tokens"]) for r in result["ttft"]} == {
        (v, n) for v in ("lmn prefill", "lmn stepping", "gpt2 stepping") for n in (16, 100)}
    [prefill] = result["prefill"]  # the export itself (no preset asked for): break-even and second turn
    assert [row["tokens"] for row in prefill["break_even"]["rows"]] == [1, 20]
    assert all(row["graph_size"] == 32 and row["prefill_ms"] > 0 and row["stepping_ms"] > 0
               for row in prefill["break_even"]["rows"])
    turn = prefill["second_turn"]
    assert set(turn["ms_median"]) == {"first turn, prefill", "second turn, prefill", "second turn, stepping"}
    assert turn["second_vs_stepping"] == turn["ms_median"]["second turn, prefill"] / turn["ms_median"]["second turn, stepping"]
    assert result["summary"]["prefill"][0]["n_embd"] == 16
    json.loads(results_json(result)[0])  # --json writes exactly this


def test_decode_speed_pieces_on_a_tiny_export(export_dir, tmp_path):
    """The decode-speed section's steppers, interleaved timing (which counts the graphs each variant
    ran), stepper overhead and profile run."""
    import runtime

    steps, files = steppers(export_dir, ("fp32",), 1)
    assert set(steps) == {"general fp32", fast("fp32")}  # this export has no quantized graphs
    assert files["fp32"][0] == "model.onnx" and len(files["fp32"]) > 1  # the step graph and its fast paths
    config = runtime.read_manifest(export_dir).model
    bare, _ = steppers(export_no_memory(config, tmp_path, ("fp32",), log=lambda m: None), ("fp32",), 1)
    steps[no_memory("fp32")] = bare[fast("fp32")]
    drive = [1, 2, 3, 4, 5] * 100
    timings = time_interleaved(steps, drive, SpeedSettings(tokens=20, rounds=2, fill=200))
    assert set(timings) == set(steps) and all(t["n_tokens"] == 40 for t in timings.values())
    assert all(sum(t["calls"].values()) == 40 for t in timings.values())  # the timed steps only, not the fill
    assert timings["general fp32"]["calls"] == {"model.onnx": 40}
    calls = timings[fast("fp32")]["calls"]  # memory full after 200 tokens: the fast paths run, picked per token
    assert set(calls) <= set(files["fp32"]) and calls["step_levels_0.onnx"] == 20  # half of 40 consecutive pointers
    py = python_overhead_us(steps[fast("fp32")], pointer=2**20 - 2, n=50)
    assert py["bare_run_us"] > 0 and py["stepper_step_us"] > 0
    level0 = runtime.read_manifest(export_dir).graph("step_levels")
    profile = profile_graph(export_dir, level0, pointer=2**20 - 2, runs=5)
    assert profile["nodes_per_run"] > 0 and abs(sum(o["share"] for o in profile["ops"]) - 1) < 1e-6


# --- the floor: the bytes a token reads, and the bandwidth at which this machine reads them ---------

def test_bytes_per_token_weighs_each_graph_by_its_runs(export_dir):
    from collections import Counter

    step, level0 = initializer_bytes(export_dir / "model.onnx"), initializer_bytes(export_dir / "step_levels_0.onnx")
    assert step > level0 > 0  # the 0-level fast path holds no summarizer weights
    # the step reads most of the weights file its precision's graphs share (the fast paths read less)
    assert 0.5 < step / (export_dir / "weights.fp32.bin").stat().st_size <= 1
    assert bytes_per_token(Counter({"model.onnx": 1, "step_levels_0.onnx": 3}), export_dir) == \
        pytest.approx((step + 3 * level0) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="no graph ran"):
        bytes_per_token(Counter(), export_dir)


def test_read_bandwidth_reads_the_whole_buffer():
    """The measurement and its negative control: a read that skips half the buffer misses the markers
    and is refused, where the full read is accepted; the figures are consistent (no timing asserted)."""
    got = read_bandwidth(1 << 20, repeats=6)
    assert got["buffer_bytes"] == 1 << 20 and got["repeats"] == 6
    assert math.isfinite(got["bytes_per_s"]) and got["bytes_per_s"] >= got["median_bytes_per_s"] > 0  # best >= median
    assert read_bandwidth(10)["buffer_bytes"] == MIN_READ_BYTES
    with pytest.raises(ReadCheckError, match="missed the marker"):
        read_bandwidth(1 << 20, repeats=6, read=lambda buffer: float(buffer[: buffer.size // 2].max()))
    f = floor_fields(mean_us=30.0, weight_bytes=2e6, bandwidth={"bytes_per_s": 1e11})
    assert f["floor_us"] == pytest.approx(20.0, rel=1e-12) and f["vs_floor"] == pytest.approx(1.5, rel=1e-12)


def test_speed_goals_are_judged_from_the_summary():
    figures = {"mean_us": 100.0, "vs_floor": 1.2, "ratio_vs_no_memory_mean": 1.4, "file_bytes": 1000}
    speed = {"logmem-512": {"fp32": figures, "int4": {**figures, "mean_us": 40.0, "vs_floor": 2.0, "file_bytes": 150}}}
    goals = {g["goal"]: g for g in goal_results(speed)}
    assert goals["logmem-512: int4 mean / fp32 mean"]["value"] == pytest.approx(0.4)
    assert not goals["logmem-512: int4 mean / fp32 mean"]["met"] and goals["logmem-512: fp32 mean / its floor"]["met"]
    assert not goals["logmem-512: int4 mean / its floor"]["met"] and goals["logmem-512: int4 files / fp32 files"]["met"]
    assert not any("logmem-128" in name for name in goals)  # not measured: not judged


# --- the lmn-bench command line itself -----------------------------------------------------------

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG = b"\x89PNG\r\n\x1a\n"
# Per-token latency ceiling: the tiny model steps in ~30 us here and its GPT-2 at 4,096 rows in ~0.3 ms;
# 0.1 s per token is 300x that (room for a loaded CI machine) and only a broken step (e.g. a whole
# sequence recomputed per token) or a unit mix-up (ns or s written as us) reaches it.
MAX_US_PER_TOKEN = 1e5


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (which json.dumps writes unless allow_nan=False)."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def is_latency(x) -> bool:
    return isinstance(x, (int, float)) and 0 < x < MAX_US_PER_TOKEN


@pytest.fixture(scope="module")
def quick_run(export_dir, tmp_path_factory):
    """`lmn-bench DIR --quick --json PATH [--plot DIR]` on the tiny export, invoked once through its command
    line (~20 s on two shared cores: the GPT-2 graphs' export dominates)."""
    out = tmp_path_factory.mktemp("bench")
    args = [str(export_dir), "--quick", "--json", str(out / "bench.json")]
    if HAVE_MATPLOTLIB:
        args += ["--plot", str(out / "charts")]
    return CliRunner().invoke(main, args), out


def test_quick_cli_writes_the_results_a_user_reads(quick_run):
    result, out = quick_run
    assert result.exit_code == 0, result.output
    assert "summary:" in result.output and f"wrote {out / 'bench.json'}" in result.output
    assert [p.name for p in out.iterdir() if TEMP_MARK in p.name] == []  # the atomic write left no temp file
    data = strict_json((out / "bench.json").read_text())
    assert {"machine", "settings", "text", "lmn", "decode", "no_memory", "memory_overhead_ratio", "ttft", "prefill",
            "decode_speed", "quality", "footprint", "summary", "non_finite"} <= set(data)
    assert "footprint per precision" in result.output and set(data["summary"]["footprint"]) == {"fp32"}
    assert [row["tokens"] for row in data["prefill"][0]["break_even"]["rows"]] == [1, 8, 32]  # --quick's lengths
    assert "second turn" in result.output and "break-even" in result.output
    assert data["non_finite"] == []
    s = data["settings"]  # --quick's sizes, and its decode-speed section times this export (nothing re-exported)
    assert (s["contexts"], s["lmn_only_contexts"], s["tokens"], s["reps"], s["prompts"]) == \
        ([1024, 4096], [16384], 50, 2, [64, 512])
    assert s["speed"]["presets"] == ["export"]
    timed = s["tokens"] * s["reps"]

    lmn = [r for r in data["decode"] if r["model"] == "lmn"]
    assert [r["n_ctx"] for r in lmn] == [1024, 4096, 16384]
    assert [r["reached_by"] for r in lmn][:2] == ["stepping", "stepping"] and lmn[2]["reached_by"].startswith("pointer")
    assert {r["state_bytes"] for r in lmn} == {data["lmn"]["state_bytes"]}  # constant, and what the manifest says
    cfg = data["lmn"]["config"]
    kv_row = 2 * cfg["n_layer"] * cfg["n_embd"] * 4  # fp32 key + value per cached token
    for layout in ("kv-inplace", "kv-concat"):
        gpt = {r["n_ctx"]: r for r in data["decode"] if r["layout"] == layout}
        assert sorted(gpt) == [1024, 4096]
        assert gpt[4096]["state_bytes"] - gpt[1024]["state_bytes"] == (4096 - 1024) * kv_row  # grows with context
        assert gpt[1024]["state_bytes"] > 100 * lmn[0]["state_bytes"]
    for r in data["decode"]:
        assert all(is_latency(r[k]) for k in ("p50_us", "p99_us", "rep_median_us_min", "rep_median_us_max")), r
        assert r["p50_us"] <= r["p99_us"] and r["n_tokens"] == timed
        assert r["tokens_per_s"] > 1e6 / MAX_US_PER_TOKEN and r["rss_bytes"] > 0

    assert is_latency(data["no_memory"]["p50_us"]) and data["no_memory"]["n_tokens"] == timed
    assert 0 < data["memory_overhead_ratio"] < 1e3 and 0 < data["memory_overhead_ratio_sequential"] < 1e3

    assert {(r["variant"], r["prompt_tokens"]) for r in data["ttft"]} == {
        (v, n) for v in ("lmn prefill", "lmn stepping", "gpt2 stepping") for n in (64, 512)}
    assert all(0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"] < 60_000 for r in data["ttft"])

    [speed] = data["decode_speed"]
    assert speed["preset"] == "export" and speed["config"] == cfg
    assert speed["weights"] == "shipped, quantized here"  # the tiny export has no int8 or int4 graphs
    precisions = ("fp32", "int8", "int4")
    assert s["speed"]["precisions"] == list(precisions)
    assert set(speed["variants"]) == {"general fp32", *map(fast, precisions), *map(no_memory, precisions)}
    for name, v in speed["variants"].items():
        assert is_latency(v["p50_us"]) and is_latency(v["mean_us"]) and v["n_tokens"] == 2 * 100, name
    assert 0 < speed["ratio_p50_vs_no_memory"] < 1e3 and speed["python"]["bare_run_us"] > 0
    assert set(speed["profile_levels_0"]) == set(precisions)

    figures = data["summary"]["speed"]["export"]
    assert list(figures) == list(precisions)
    for precision, f in figures.items():  # present, finite, and consistent with each other and the variants
        assert set(FIELDS) <= set(f) and all(isinstance(f[k], (int, float)) and math.isfinite(f[k]) for k in f), f
        assert f["mean_us"] == speed["variants"][fast(precision)]["mean_us"]
        assert f["no_memory_mean_us"] == speed["variants"][no_memory(precision)]["mean_us"]
        assert f["ratio_vs_no_memory_mean"] == pytest.approx(f["mean_us"] / f["no_memory_mean_us"], rel=1e-9)
        assert f["floor_us"] == pytest.approx(f["weight_bytes"] / f["read_bytes_per_s"] * 1e6, rel=1e-9)
        assert f["vs_floor"] == pytest.approx(f["mean_us"] / f["floor_us"], rel=1e-9)
        assert 1e3 < f["weight_bytes"] < f["file_bytes"] and f["read_bytes_per_s"] > 1e6
    # weight-only int4 and int8 read fewer bytes than fp32 (the tiny model's matrices are only 16 wide:
    # the ratios are far from 4 bits / 32, but the order holds)
    assert figures["int4"]["weight_bytes"] < figures["int8"]["weight_bytes"] < figures["fp32"]["weight_bytes"]
    assert figures["int4"]["file_bytes"] < figures["fp32"]["file_bytes"]
    goals = data["summary"]["speed_goals"]  # only goals of the presets this run timed: none for `export`
    assert goals == []

    # the tiny model's 43 characters do not cover the corpus (and CI may lack it): quality is skipped, and says so
    assert data["quality"] == [] and "quality skipped" in data["text"]

    summary = data["summary"]
    assert summary["lmn_state_bytes_constant"] is True and summary["at_context"] == 4096
    assert summary["lmn_contexts"] == [1024, 16384]
    inplace_4096 = next(r for r in data["decode"] if r["layout"] == "kv-inplace" and r["n_ctx"] == 4096)
    assert summary["state_ratio_vs_kv"] == pytest.approx(inplace_4096["state_bytes"] / lmn[0]["state_bytes"])
    assert 0 < summary["speedup_vs_kv_inplace"] < 1e3 and 0 < summary["speedup_vs_kv_concat"] < 1e3


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="--plot needs matplotlib (pip install 'lmn[bench]'), not installed here")
def test_quick_cli_plots(quick_run):
    result, out = quick_run
    assert result.exit_code == 0, result.output
    charts = out / "charts"
    assert sorted(p.name for p in charts.iterdir()) == ["latency.png", "state.png"]  # and no temp file left
    for png in charts.iterdir():
        head = png.read_bytes()[:24]
        assert head[:8] == PNG and head[12:16] == b"IHDR", png
        assert struct.unpack(">II", head[16:24]) == (720, 480), png  # 6 x 4 inches at 120 dpi: a whole chart


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    r = CliRunner().invoke(main, [str(tmp_path / "no-export"), "--json", str(tmp_path / "out.json"),
                                  "--plot", str(tmp_path / "charts")])
    assert r.exit_code == 2 and "--plot" in r.output and "pip install 'lmn[bench]'" in r.output, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "charts").exists()


@pytest.fixture
def locked_dir(tmp_path):
    """A folder this user cannot create files in: a read-only folder, or /sys where root ignores the
    permission bits (sysfs refuses new files even to root); skipped when neither refuses."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for candidate in (locked, Path("/sys")):
            try:
                (candidate / "probe").touch()
                (candidate / "probe").unlink()
            except OSError:
                yield candidate
                return
        pytest.skip("no folder here refuses new files to this user (root, and no read-only /sys)")
    finally:
        locked.chmod(0o700)


BAD_ARGUMENTS = {  # arguments -> the option the one-line error must name
    "contexts-abc": (["--contexts", "abc"], "--contexts"),
    "contexts-empty": (["--contexts", ""], "--contexts"),
    "contexts-zero": (["--contexts", "0"], "--contexts"),
    "contexts-negative": (["--contexts", "-1024"], "--contexts"),
    "contexts-empty-entry": (["--contexts", "1024,,4096"], "--contexts"),
    "lmn-contexts-abc": (["--lmn-contexts", "1M"], "--lmn-contexts"),
    "lmn-contexts-zero": (["--lmn-contexts", "0"], "--lmn-contexts"),
    "lmn-contexts-negative": (["--lmn-contexts", "-1"], "--lmn-contexts"),
    "lmn-contexts-over-int64": (["--lmn-contexts", str(1 << 63)], "--lmn-contexts"),
    "tokens-zero": (["--tokens", "0"], "--tokens"),
    "reps-zero": (["--reps", "0"], "--reps"),
    "threads-zero": (["--threads", "0"], "--threads"),
    "threads-negative": (["--threads", "-1"], "--threads"),
    "speed-presets-unknown": (["--speed-presets", "logmem-32,logmem-64"], "--speed-presets"),
    "speed-presets-gpt": (["--speed-presets", "gpt2-32"], "--speed-presets"),  # the section times LMNs
    "speed-presets-levels-zero": (["--speed-presets", "logmem-32@0"], "--speed-presets"),
    "speed-presets-levels-over": (["--speed-presets", "logmem-32@63"], "--speed-presets"),
    "speed-presets-levels-word": (["--speed-presets", "logmem-32@ten"], "--speed-presets"),
    "speed-presets-export-levels": (["--speed-presets", "export@21"], "--speed-presets"),  # its own config
    "recall-distances-zero": (["--recall-distances", "0"], "--recall-distances"),
    "recall-distances-word": (["--recall-distances", "1K"], "--recall-distances"),
    "recall-without-checkpoints": (["--sections", "recall"], "--recall-checkpoints"),
    "recall-checkpoint-missing": (["--recall-checkpoints", "{tmp}/nothing"], "--recall-checkpoints"),
    "speed-precisions-unknown": (["--speed-precisions", "int4,fp16"], "--speed-precisions"),
    "json-parent-missing": (["--json", "{tmp}/missing/out.json"], "--json"),
    "json-is-a-folder": (["--json", "{tmp}"], "--json"),
    "json-parent-is-a-file": (["--json", "{tmp}/file.txt/out.json"], "--json"),
    "json-parent-not-writable": (["--json", "{locked}/out.json"], "--json"),
    "json-not-a-regular-file": (["--json", os.devnull], "--json"),  # an atomic rename would replace the device
    "plot-is-a-file": (["--plot", "{tmp}/file.txt"], "--plot"),
    "plot-under-a-file": (["--plot", "{tmp}/file.txt/charts"], "--plot"),
    "plot-not-creatable": (["--plot", "{locked}/charts"], "--plot"),
    "sections-unknown": (["--sections", "decode,training"], "--sections"),
    "sections-empty": (["--sections", " , "], "--sections"),
    "plot-without-decode": (["--sections", "train", "--plot", "{tmp}/charts"], "--plot"),  # nothing to chart
    "device-unknown": (["--device", "tpu"], "--device"),
    "train-batch-zero": (["--train-batch", "0"], "--train-batch"),
    "train-block-one": (["--train-block", "1"], "--train-block"),  # a step needs a next token to predict
    "train-steps-zero": (["--train-steps", "0"], "--train-steps"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_fail_up_front_in_one_line(case, tmp_path, request):
    args, option = BAD_ARGUMENTS[case]
    (tmp_path / "file.txt").write_text("not a folder")
    locked = request.getfixturevalue("locked_dir") if any("{locked}" in a for a in args) else None
    args = [a.format(tmp=tmp_path, locked=locked) for a in args]
    out = tmp_path / "results.json"
    if "--json" not in args:
        args += ["--json", str(out)]
    # a missing export folder: if validation ever let the arguments through, the run fails at once (exit 1)
    r = CliRunner().invoke(main, [str(tmp_path / "no-export"), *args])
    assert r.exit_code == 2, r.output  # click's usage error, raised before any work
    assert f"Invalid value for '{option}'" in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) <= 3  # usage, --help hint, the error
    assert "Traceback" not in r.output
    assert isinstance(r.exception, SystemExit) and "building" not in r.output
    assert not out.exists() and not (tmp_path / "missing").exists() and not (tmp_path / "charts").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"] + (["locked"] if locked else [])
    if locked:
        assert not (locked / "out.json").exists() and not (locked / "charts").exists()


def test_lmn_contexts_may_be_empty_and_contexts_are_sorted_once():
    param = {p.name: p for p in main.params}
    assert parse_contexts(None, param["lmn_contexts"], "") == ()  # documented: no LMN-only contexts
    assert parse_contexts(None, param["contexts"], " 4096, 1024,1024 ") == (1024, 4096)
    assert parse_presets(None, param["speed_presets"], "export, logmem-32,export") == ("export", "logmem-32")
    assert parse_presets(None, param["speed_presets"], "") == ()  # documented: skip the section
    assert parse_presets(None, param["speed_presets"], "logmem-32,logmem-32@21") == ("logmem-32", "logmem-32@21")
    assert parse_precisions(None, param["speed_precisions"], "int4, dynamic-int8,int4") == ("fp32", "int4", "dynamic-int8")


def test_a_missing_export_is_one_line(tmp_path):
    r = CliRunner().invoke(main, [str(tmp_path / "no-export"), "--json", str(tmp_path / "out.json")])
    assert r.exit_code == 1 and "no export folder" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out.json").exists()


def test_bad_argument_from_the_installed_command(tmp_path):
    """The real process (console script, else `python -m`): one line on stderr, exit 2, nothing written."""
    script = Path(sys.executable).with_name("lmn-bench")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lmn_export.bench"]
    done = subprocess.run([*command, "--contexts", "abc", "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Invalid value for '--contexts'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == "" and not (tmp_path / "out.json").exists()


def test_quick_keeps_the_options_given_on_the_command_line(monkeypatch):
    seen = []

    def stop(directory, s, log):  # the settings main builds, without the run
        seen.append(s)
        raise runtime.ManifestError("stopped by the test")

    monkeypatch.setattr(command, "run", stop)
    r = CliRunner().invoke(main, ["--quick", "--contexts", "64,32", "--lmn-contexts", "", "--reps", "3"])
    assert r.exit_code == 1 and "stopped by the test" in r.output, r.output
    s = seen[0]
    assert (s.contexts, s.lmn_only_contexts, s.reps) == ((32, 64), (), 3)  # given: kept
    assert (s.tokens, s.warmup, s.prompts, s.speed.presets, s.speed.tokens) == (50, 10, (64, 512), ("export",), 100)
    assert gpt_positions(s) == 513  # the 512-token prompt, not the 64-token context, sizes the GPT-2 baseline
    CliRunner().invoke(main, ["--quick", "--speed-presets", "logmem-128,logmem-32", "--tokens", "7"])
    assert seen[1].speed.presets == ("logmem-128", "logmem-32") and seen[1].tokens == 7 and seen[1].contexts == (1024, 4096)
    CliRunner().invoke(main, [])
    assert seen[2] == Settings()  # no --quick: the defaults
    assert seen[2].speed.presets == ("logmem-32", "logmem-128", "logmem-512")
    assert seen[2].speed.precisions == ("fp32", "int8", "int4")


def test_non_finite_numbers_are_written_as_null_and_listed():
    r = {"a": 1.5, "b": [float("nan"), 2], "c": {"d": np.float32("inf"), "e": np.int64(3), "f": np.bool_(True)},
         "g": "x", "h": (np.float64(-np.inf),)}
    text, replaced = results_json(r)
    assert strict_json(text) == {"a": 1.5, "b": [None, 2], "c": {"d": None, "e": 3, "f": True}, "g": "x", "h": [None],
                                 "non_finite": ["b[0]", "c.d", "h[0]"]}
    assert replaced == ["b[0]", "c.d", "h[0]"] and finite_json({"ok": 1.0}) == ({"ok": 1.0}, [])


# --- the train section ------------------------------------------------------------------------------

def test_sections_are_checked_names_in_run_order():
    param = {p.name: p for p in main.params}["sections"]
    assert parse_sections(None, param, "train, decode,train") == ("decode", "train")
    assert param.default == "decode,ttft,prefill,speed,quality,footprint" and SECTIONS[-1] == "train"  # train: asked for, never by default
    with pytest.raises(Exception, match="unknown 'decoding'"):
        parse_sections(None, param, "decoding")


def test_gpt2_128_trains_at_its_position_table():
    assert train_block(preset("gpt2-128"), 512) == 256 and train_block(preset("gpt2-32"), 512) == 512
    assert train_block(preset("logmem-128"), 4096) == 4096 and train_block(preset("gpt2-128"), 32) == 32


def test_train_section_at_a_tiny_size(tmp_path):
    """`lmn-bench --sections train` at batch 2 x block 32, 2 steps per round: no export is loaded, every
    preset pair is timed, the ratios are the quotients of the rows, and the JSON is standard."""
    out = tmp_path / "train.json"
    r = CliRunner().invoke(main, [str(tmp_path / "no-export"), "--sections", "train", "--train-batch", "2",
                                  "--train-block", "32", "--train-steps", "2", "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = strict_json(out.read_text())
    assert set(data) == {"machine", "settings", "train", "summary", "non_finite"} and data["non_finite"] == []
    assert data["settings"]["sections"] == ["train"]
    assert data["settings"]["train"] == {"batch": 2, "block": 32, "steps": 2, "rounds": 5, "device": "cpu"}
    rows = {row["preset"]: row for row in data["train"]}
    assert list(rows) == ["logmem-32", "gpt2-32", "logmem-128", "gpt2-128"]
    for name, row in rows.items():
        assert {"preset", "device", "precision", "batch", "block", "tokens_per_s"} <= set(row), name
        assert (row["device"], row["precision"], row["batch"], row["block"]) == ("cpu", "fp32", 2, 32), name
        assert isinstance(row["tokens_per_s"], float) and math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert len(row["round_tokens_per_s"]) == 5 and row["tokens_per_s"] in row["round_tokens_per_s"]  # median of 5
    ratio = data["summary"]["train_ratio"]
    assert set(ratio) == {"32", "128"}
    for width in ("32", "128"):
        assert ratio[width] == pytest.approx(rows[f"logmem-{width}"]["tokens_per_s"] / rows[f"gpt2-{width}"]["tokens_per_s"],
                                             rel=1e-12)
    assert "training throughput" in r.output and "LMN / GPT-2 at width 128" in r.output
    assert "decode" not in data and "no export folder" not in r.output  # the export sections did not run


def test_train_section_says_when_gpt2_trains_at_a_shorter_block(monkeypatch):
    """At the default block 512, GPT-2-128 trains at 256 (its position table), and the report says so."""
    r = {"settings": {"threads": 1, "train": {"batch": 16, "block": 512, "steps": 3, "rounds": 5, "device": "cpu"}},
         "train": [{"preset": name, "device": "cpu", "precision": "fp32", "batch": 16, "block": block, "tokens_per_s": tps}
                   for name, block, tps in (("logmem-128", 512, 3.0), ("gpt2-128", 256, 4.0))],
         "machine": {"cpu": "x", "cores": 2, "os": "y", "numpy": "1", "onnxruntime": "1"}}
    r["summary"] = summarize(r)
    assert r["summary"] == {"train_ratio": {"128": 0.75}}
    lines = []
    monkeypatch.setattr(report.click, "echo", lambda text="", **kw: lines.append(text))
    report.print_report(r)
    gpt = next(line for line in lines if "gpt2-128" in line)
    assert "block   256 (its position table)" in gpt and "LMN / GPT-2 at width 128: 0.75" in gpt


def test_reach_scores_every_position_as_stepping_does(tmp_path, corpus_text):
    """The reach section: an LMN's loss at each position equals stepping the stream (parallel mode from each chunk's
    carried state: 1e-4, fp32 over 5,000 positions and two chunks); a GPT-2 is scored through its sliding window;
    bins cover the positions read. Negative control: the same GPT-2 reading a shorter window differs."""
    import torch.nn.functional as F

    from lmn_export.bench import reach
    from lmn_export.bench.reach import ReachSettings, bench_reach, position_losses
    from models import LMN, LMNConfig
    from models.checkpoint import save
    from models.data import CharVocab

    vocab = CharVocab.from_text(corpus_text)
    torch.manual_seed(0)
    lmn = LMN(LMNConfig(vocab_size=len(vocab), n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=14)).eval()
    gpt = GPT(GPTConfig(vocab_size=len(vocab), n_embd=16, n_head=2, n_layer=2, block_size=64)).eval()
    save(tmp_path / "lmn", lmn, vocab)
    save(tmp_path / "gpt", gpt, vocab)
    val = corpus_text[int(len(corpus_text) * 0.9):]
    ids = np.asarray(vocab.encode(val[:301]))
    with torch.no_grad():
        state, stepped = lmn.init_state(1), []
        for t in range(300):
            logits, state = lmn.step(torch.tensor([int(ids[t])]), state)
            stepped.append(F.cross_entropy(logits, torch.tensor([int(ids[t + 1])])).item())
    old = reach.CHUNK
    reach.CHUNK = 128  # three chunks over 300 positions: the carried state crosses two boundaries
    try:
        np.testing.assert_allclose(position_losses(lmn, ids), stepped, atol=1e-4)
    finally:
        reach.CHUNK = old
    rows = bench_reach(ReachSettings(checkpoints=(str(tmp_path / "lmn"), str(tmp_path / "gpt")), tokens=600), lambda m: None)
    assert [r["model"] for r in rows] == ["LMN, 14 levels", "GPT-2, sliding window of 64"]
    assert [(b["from"], b["to"], b["tokens"]) for b in rows[0]["bins"]] == [(0, 512, 512), (512, 600, 88)]
    with torch.no_grad():  # position 100 is scored by the window of positions 96..127 (cut at 101): it reads 64..100
        window = gpt(torch.from_numpy(ids[64:101].astype(np.int64)).view(1, -1))[0, -1]
    sliding = position_losses(gpt, ids[:102])
    assert sliding[100] == pytest.approx(F.cross_entropy(window.view(1, -1), torch.tensor([int(ids[101])])).item(), abs=1e-4)
    with torch.no_grad():
        short = gpt(torch.from_numpy(ids[80:101].astype(np.int64)).view(1, -1))[0, -1]
    assert abs(sliding[100] - F.cross_entropy(short.view(1, -1), torch.tensor([int(ids[101])])).item()) > 1e-3


def test_footprint_counts_every_file_a_precision_opens_and_each_weight_once(export_dir):
    """The footprint row adds up the files lmn.json gives the precision's graphs and the weights file they share,
    and its weights are the step graph's initializers counted by content (what one copy costs); resident memory
    is measured, positive and finite (its size is the machine's: only bounded)."""
    manifest = runtime.load(export_dir).manifest
    [row] = bench_footprint(runtime.load(export_dir), 1, log=lambda m: None)  # the tiny export: fp32 only
    graphs = manifest.graphs("onnx", precision="fp32")
    files = {g["file"] for g in graphs} | {g["weights"] for g in graphs}
    assert row["files"] == len(files) == 7  # the step, four fast paths, one prefill graph and weights.fp32.bin
    assert row["file_bytes"] == sum((export_dir / f).stat().st_size for f in files)
    step = onnx.load(str(export_dir / manifest.graph("step", "onnx", "fp32")["file"]))
    every = sum(numpy_helper.to_array(t).nbytes for t in step.graph.initializer)
    assert 0 < row["weight_bytes"] <= every
    assert row["files_vs_weights"] == pytest.approx(row["file_bytes"] / row["weight_bytes"])
    # a tiny model's graphs (structure) outweigh its weights, so even one copy of them misses the goal
    assert row["files_vs_weights"] > 1.15 and row["goals"]["files_vs_weights"] == {"limit": 1.15, "met": False}
    assert 0 < row["rss_bytes"] < 2**32 and math.isfinite(row["rss_vs_weights_and_state"])
    assert row["state_bytes"] == manifest.data["state"]["bytes_per_stream"]


def test_weight_bytes_counts_a_tensor_stored_twice_once(tmp_path):
    """The negative control of the weights figure: two initializers with equal contents are one copy, two
    with different contents (or the same bytes in another shape) are two."""
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    inits = [numpy_helper.from_array(a, "w1"), numpy_helper.from_array(a.copy(), "w2"),
             numpy_helper.from_array(a + 1, "w3"), numpy_helper.from_array(a.reshape(4, 16), "w4")]
    nodes = [helper.make_node("Add", ["w1", "w2"], ["s"]), helper.make_node("Add", ["s", "w3"], ["t"]),
             helper.make_node("Reshape", ["w4", "shape"], ["u"]), helper.make_node("Add", ["t", "u"], ["y"])]
    inits.append(numpy_helper.from_array(np.array([8, 8], np.int64), "shape"))
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert weight_bytes(path) == 3 * a.nbytes + 16


def test_footprint_says_when_the_memory_cannot_be_measured(tmp_path):
    with pytest.raises(RuntimeError, match="measuring the resident memory of .* at fp32 failed: .*"):
        measure_loaded(tmp_path / "missing", "fp32", 1)
