"""The runtime library: loading, streams, sampling, shared sessions, state files, vocabulary policy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import ContextFullError, ManifestError, StateFileError, Stream, UnknownCharacterError

PROMPT = "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def test_runtime_never_imports_torch(export_dir):
    """The device package runs with numpy and onnxruntime only."""
    code = (
        "import sys, runtime\n"
        f"m = runtime.load({str(export_dir)!r})\n"
        "s = runtime.Stream(m); s.feed('To be, or not'); text = ''.join(s.generate(20, seed=0))\n"
        "bad = sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))\n"
        "print(len(text), bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "20 []"


def test_prefill_equals_stepping(export_dir):
    model = runtime.load(export_dir)
    a, b = Stream(model), Stream(model)
    a.feed(PROMPT)  # first long prompt: the prefill graph (32) then steps
    for char in PROMPT:
        b.feed(char)  # one token at a time
    assert a.tokens_seen == b.tokens_seen == len(PROMPT)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)  # fp32, two graphs: ~1e-7 observed
    for name in a.stepper.state:
        np.testing.assert_allclose(a.stepper.state[name], b.stepper.state[name], atol=1e-5)


def test_preload_opens_every_prefill_graph_once_and_changes_nothing(export_dir):
    """preload() opens the prefill graphs a later prompt would open on first use (and only once): the same
    runner serves the prompt afterwards, with the same logits as a model that opens it lazily."""
    lazy, loaded = runtime.load(export_dir), runtime.load(export_dir)
    assert lazy._prefill_runners == {}
    loaded.preload()
    runners = dict(loaded._prefill_runners)
    assert sorted(runners) == [g["size"] for g in loaded.prefill_graphs] and runners
    loaded.preload()
    assert loaded._prefill_runners == runners  # nothing reopened
    a, b = Stream(lazy), Stream(loaded)
    a.feed(PROMPT)
    b.feed(PROMPT)
    assert loaded._prefill_runners == runners
    np.testing.assert_array_equal(a.logits, b.logits)  # the same graph and inputs: the same numbers


def test_fast_paths_stream_like_the_general_graph(export_dir):
    """The stepper's per-token choice of fast path changes nothing but speed: 300 tokens (past the
    point where the memory is full, every k) match the general step graph run alone."""
    from runtime.backends import OnnxStepper

    model = runtime.load(export_dir)
    assert set(model.fast_paths) == {0, 1, 2, 3} and model.config["max_levels"] == 8
    fast, general = model.stepper(), OnnxStepper(model.session, model.step_graph)
    ids = model.vocab.encode((PROMPT * 5)[:300])
    for i in ids:
        np.testing.assert_allclose(fast.step(i), general.step(i), atol=1e-5)  # fp32, other graphs: ~1e-6
    np.testing.assert_allclose(fast.state["memory"], general.state["memory"], atol=1e-5)
    assert fast.state["pointer"][0] == general.state["pointer"][0] == 300


def test_generation_is_seeded_and_greedy_at_zero(export_dir):
    model = runtime.load(export_dir)

    def run(**kw):
        s = Stream(model)
        s.feed(PROMPT)
        return "".join(s.generate(40, **kw))

    assert run(temperature=0.9, seed=7) == run(temperature=0.9, seed=7)
    assert run(temperature=0.9, seed=7) != run(temperature=0.9, seed=8)
    greedy = run(temperature=0)
    assert greedy == run(temperature=0, seed=123)
    assert len(run(temperature=1.0, top_k=3, top_p=0.9, seed=1)) == 40


def test_stop_string_ends_generation(export_dir):
    s = Stream(runtime.load(export_dir))
    s.feed(PROMPT)
    out = "".join(s.generate(500, temperature=1.0, seed=3, stop=("e",)))
    assert out.endswith("e") and out.count("e") == 1


def test_streams_share_one_session_across_threads(export_dir):
    model = runtime.load(export_dir)
    expected = {}
    for seed in range(4):
        s = Stream(model)
        s.feed(PROMPT[: 10 + seed])
        expected[seed] = "".join(s.generate(60, temperature=0.8, seed=seed))
    got = {}

    def work(seed):
        s = Stream(model)
        s.feed(PROMPT[: 10 + seed])
        got[seed] = "".join(s.generate(60, temperature=0.8, seed=seed))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_state_round_trip_and_size(export_dir, tmp_path):
    model = runtime.load(export_dir)
    s = Stream(model)
    s.feed(PROMPT * 5)
    size = s.save(tmp_path / "a.state")
    assert size < model.state_bytes + 2048  # the state plus logits and a small header
    restored = Stream(model)
    restored.load(tmp_path / "a.state")
    assert restored.tokens_seen == s.tokens_seen
    assert "".join(restored.generate(30, seed=2)) == "".join(s.generate(30, seed=2))


def test_bad_state_files_are_refused_whole(export_dir, other_export_dir, tmp_path):
    model = runtime.load(export_dir)
    s = Stream(model)
    s.feed(PROMPT)
    s.save(tmp_path / "good.state")
    data = (tmp_path / "good.state").read_bytes()
    (tmp_path / "cut.state").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.state").write_bytes(bytes(flipped))
    target = Stream(model)
    target.feed("To be")
    before = {k: v.copy() for k, v in target.stepper.state.items()}
    for name, message in (("cut", "truncated or corrupt"), ("flip", "truncated or corrupt"), ("none", "no such file")):
        with pytest.raises(StateFileError, match=message):
            target.load(tmp_path / f"{name}.state")
    other = Stream(runtime.load(other_export_dir))
    with pytest.raises(StateFileError, match="another model"):
        other.load(tmp_path / "good.state")
    for k, v in target.stepper.state.items():
        np.testing.assert_array_equal(v, before[k])  # nothing half-loaded
    assert target.tokens_seen == 5


def test_unknown_characters_policy(export_dir):
    strict = Stream(runtime.load(export_dir))
    with pytest.raises(UnknownCharacterError, match="Z"):
        strict.feed("Zebra")
    assert strict.tokens_seen == 0
    lenient = Stream(runtime.load(export_dir, unknown="skip"))
    lenient.feed("Zebra")
    assert lenient.tokens_seen == 4
    with pytest.raises(ValueError, match="out of range"):
        strict.feed_ids([len(strict.model.vocab)])


def test_load_errors_are_clear(export_dir, tmp_path):
    with pytest.raises(ManifestError, match="no export folder"):
        runtime.load(tmp_path / "missing")
    with pytest.raises(ManifestError, match="lmn.json is missing"):
        runtime.load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    manifest = json.loads((copy / "lmn.json").read_text())
    manifest["format_version"] = 99
    (copy / "lmn.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format version 99"):
        runtime.load(copy)
    (copy / "lmn.json").write_text("{")
    with pytest.raises(ManifestError, match="corrupt"):
        runtime.load(copy)


def test_coreml_backend_needs_a_coreml_graph(export_dir):
    """An ONNX-only export asked for Core ML says how to get a Core ML graph (the platform check
    itself is tested on an export that has one: tests/lmn_export/test_export_folder.py)."""
    with pytest.raises(ManifestError, match="no fp32 Core ML step graph; re-export with lmn-export --to coreml"):
        runtime.load(export_dir, backend="coreml")


def test_which_graph_ran_is_observable(export_dir):
    """Every chunk fed at once runs the prefill graph, in pieces of the largest; steps past the full memory
    run the fast paths; a chunk shorter than min_prompt_tokens is stepped."""
    model = runtime.load(export_dir)
    s = Stream(model)
    s.feed(PROMPT)  # 85 characters: prefill_32 twice, then the last 21 (>= 16) prefilled too
    assert s.graph_calls == {"prefill_32.onnx": 3}
    for char in (PROMPT * 4)[:200]:  # one token a turn, to pointer 285: past 2^(8-1) = 128, the fast paths take over
        s.feed(char)
    fast = {f: n for f, n in s.graph_calls.items() if f.startswith("step_levels_")}
    assert set(fast) == {f"step_levels_{k}.onnx" for k in range(4)}
    assert sum(fast.values()) >= (285 - 128) * 15 // 16 - 2  # 15 of 16 steps once the memory is full
    before = s.graph_calls
    s.feed(PROMPT[:40])  # a second turn: prefilled from the stream's state (pointer 285), 32 + the last 8 stepped
    assert s.graph_calls - before == {"prefill_32.onnx": 1, "step_levels_0.onnx": 4, "step_levels_1.onnx": 2,
                                      "step_levels_2.onnx": 1, "model.onnx": 1}
    short = Stream(model)
    short.feed("To be")  # shorter than PREFILL_MIN_TOKENS: stepped
    assert short.graph_calls == {"model.onnx": 5}


@pytest.mark.parametrize("start", [0, 2**31 - 50, 2**62 + 3])
def test_later_turns_are_prefilled_from_the_stream_state(export_dir, start):
    """Turns fed at once after others (at odd pointers, past 2^k, across 2^31) leave the logits and state that
    stepping every token leaves: within 1e-5 (fp32, prefill and step graphs: ~1e-7 observed)."""
    model = runtime.load(export_dir)
    turns = ["To be, or not", PROMPT, " to be: that is", (PROMPT * 2)[:77]]
    fed, stepped = Stream(model, pointer=start), Stream(model, pointer=start)
    for turn in turns:
        fed.feed(turn)
        for char in turn:
            stepped.feed(char)
        np.testing.assert_allclose(fed.logits, stepped.logits, atol=1e-5)
        for name in fed.stepper.state:
            np.testing.assert_allclose(fed.stepper.state[name], stepped.stepper.state[name], atol=1e-5)
    prefills = sum(n for f, n in fed.graph_calls.items() if f.startswith("prefill_"))
    # the 13- and 15-token turns (< min_prompt_tokens 16): stepped; PROMPT (85): 32 + 32 + 21; 77: 32 + 32, 13 stepped
    assert prefills == 3 + 2
    assert not any(f.startswith("prefill_") for f in stepped.graph_calls)


def test_a_prefill_past_the_pointer_bound_feeds_nothing(export_dir):
    model = runtime.load(export_dir)
    s = Stream(model, pointer=model.pointer_max - 20)
    with pytest.raises(ContextFullError):
        s.feed(PROMPT)  # 85 tokens from 21 below the bound
    assert s.tokens_seen == 0 and s.stepper.pointer == model.pointer_max - 20 and not s.graph_calls
    s.feed(PROMPT[:21])  # exactly fits: prefilled, the last token at pointer_max
    assert s.stepper.pointer == model.pointer_max + 1 and s.graph_calls == {"prefill_32.onnx": 1}


def test_long_stream_keeps_memory_flat(export_dir):
    """200,000 tokens: state bytes constant and the process's resident memory flat."""
    code = (
        "import runtime, numpy as np\n"
        f"s = runtime.Stream(runtime.load({str(export_dir)!r}))\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "chunk = np.random.default_rng(0).integers(0, len(s.model.vocab), 10_000).tolist()\n"
        "for i in range(20):\n"
        "    s.feed_ids(chunk)\n"
        "    if i == 1: early, bytes_early = rss(), s.state_bytes\n"
        "late = rss()\n"
        "print(s.tokens_seen, bytes_early, s.state_bytes, late - early, bool(np.isfinite(s.logits).all()))\n"
    )
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc to read resident memory")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    seen, bytes_early, bytes_late, growth, finite = done.stdout.split()
    assert int(seen) == 200_000 and bytes_early == bytes_late and finite == "True"
    # Allocator noise only: a per-token leak of even 32 bytes would add ~5.8 MB over 180k tokens.
    assert int(growth) < 2 * 1024 * 1024, f"resident memory grew by {int(growth):,} bytes"
