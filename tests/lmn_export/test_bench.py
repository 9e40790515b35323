"""lmn-bench's own logic on tiny models, in seconds (timings themselves are never asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmn_export.bench import KVConcatStepper, KVRowsStepper, Settings, Timing, run, session, summarize
from lmn_export.decode_speed import (NO_MEMORY, SpeedSettings, export_no_memory, profile_graph, python_overhead_us,
                                     steppers, time_interleaved)
from lmn_export.onnx_export import export_kv_layout
from models import GPT, GPTConfig


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
    s = Settings(contexts=(64,), lmn_only_contexts=(256,), tokens=5, reps=2, warmup=2, prompts=(16,),
                 quality_chars=200, speed=SpeedSettings(presets=()))
    result = run(export_dir, s, log=lambda m: None)
    lmn = [r for r in result["decode"] if r["model"] == "lmn"]
    assert [r["n_ctx"] for r in lmn] == [64, 256] and len({r["state_bytes"] for r in lmn}) == 1
    assert {r["layout"] for r in result["decode"]} == {"memory", "kv-inplace", "kv-concat"}
    gpt = [r for r in result["decode"] if r["layout"] == "kv-inplace"]
    assert gpt[0]["state_bytes"] > lmn[0]["state_bytes"]
    assert result["memory_overhead_ratio"] > 0 and {r["variant"] for r in result["ttft"]} >= {"lmn prefill"}
    json.dumps(result)  # --json writes exactly this


def test_decode_speed_pieces_on_a_tiny_export(export_dir, tmp_path):
    """The decode-speed section's steppers, interleaved timing, stepper overhead and profile run."""
    import runtime

    steps = steppers(export_dir, 1)
    assert set(steps) == {"general", "fast paths"}  # this export has no int8 graphs
    config = runtime.read_manifest(export_dir).model
    bare = steppers(export_no_memory(config, tmp_path, log=lambda m: None), 1)
    steps[NO_MEMORY] = bare["general"]
    drive = [1, 2, 3, 4, 5] * 100
    timings = time_interleaved(steps, drive, SpeedSettings(tokens=20, rounds=2, fill=200))
    assert set(timings) == set(steps) and all(t["n_tokens"] == 40 for t in timings.values())
    py = python_overhead_us(steps["fast paths"], pointer=2**20 - 2, n=50)
    assert py["bare_run_us"] > 0 and py["stepper_step_us"] > 0
    level0 = runtime.read_manifest(export_dir).graph("step_levels")
    profile = profile_graph(export_dir, level0, pointer=2**20 - 2, runs=5)
    assert profile["nodes_per_run"] > 0 and abs(sum(o["share"] for o in profile["ops"]) - 1) < 1e-6
