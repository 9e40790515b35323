"""Nothing a user types or a fault does loses data, hangs a session or passes silently (runtime side).

Each test asserts the error a user sees and that nothing changed or was half-written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import ContextFullError, ManifestError, StateFileError, Stream
from runtime.atomic import TEMP_MARK, write_atomic
from runtime.chat import Chat
from runtime.manifest import manifest_text

from .state_files import forge

PROMPT = "To be, or not to be: that is the question:\n"


def continuation(model, max_tokens: int, **kw) -> str:
    """What a fresh stream generates after PROMPT."""
    s = Stream(model)
    s.feed(PROMPT)
    return "".join(s.generate(max_tokens, **kw))


def snapshot(stream: Stream):
    return ({k: v.copy() for k, v in stream.stepper.state.items()}, stream.tokens_seen,
            None if stream.logits is None else stream.logits.copy())


def assert_unchanged(stream: Stream, before) -> None:
    state, seen, logits = before
    for k, v in stream.stepper.state.items():
        np.testing.assert_array_equal(v, state[k])
    assert stream.tokens_seen == seen
    if logits is None:
        assert stream.logits is None
    else:
        np.testing.assert_array_equal(stream.logits, logits)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name or p.name.endswith(".tmp"))


# --- state files --------------------------------------------------------------------------------


@pytest.mark.faults
def test_concurrent_saves_to_one_path_never_tear(export_dir, tmp_path):
    """4 writers save different streams to one path while a reader loads it: every save succeeds,
    every load sees one whole file (one of the four), and no temp file is left behind."""
    model = runtime.load(export_dir)
    streams = []
    for i in range(4):
        s = Stream(model)
        s.feed(PROMPT[: 5 + i])
        streams.append(s)
    path = tmp_path / "shared.state"
    streams[0].save(path)
    errors, loads, done = [], [0], threading.Event()

    def writer(s):
        try:
            for _ in range(60):
                s.save(path)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    def reader():
        target = Stream(model)
        while not done.is_set():
            try:
                target.load(path)
                assert target.tokens_seen in {5, 6, 7, 8}
                loads[0] += 1
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=writer, args=(s,)) for s in streams]
    read = threading.Thread(target=reader)
    read.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    read.join()
    assert errors == [] and loads[0] > 0
    assert leftovers(tmp_path) == []


def test_save_refuses_a_directory_and_leaves_nothing(export_dir, tmp_path):
    s = Stream(runtime.load(export_dir))
    s.feed("To be")
    (tmp_path / "dir.state").mkdir()
    with pytest.raises(StateFileError, match="is a directory"):
        s.save(tmp_path / "dir.state")
    assert leftovers(tmp_path) == [] and list((tmp_path / "dir.state").iterdir()) == []


def test_save_writes_through_symlinks_and_keeps_the_mode(export_dir, tmp_path):
    s = Stream(runtime.load(export_dir))
    s.feed("To be")
    real = tmp_path / "real.state"
    real.write_bytes(b"old")
    os.chmod(real, 0o444)
    link = tmp_path / "link.state"
    link.symlink_to(real)
    s.save(link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert oct(real.stat().st_mode & 0o777) == oct(0o444)
    Stream(s.model).load(link)  # the new state, whole
    fresh = tmp_path / "fresh.state"
    s.save(fresh)
    umask = os.umask(0)
    os.umask(umask)
    assert oct(fresh.stat().st_mode & 0o777) == oct(0o666 & ~umask)


@pytest.mark.faults
def test_full_disk_keeps_the_old_state_file(export_dir, tmp_path):
    """A write cut short by the file-size limit (the kernel's stand-in for a full disk: EFBIG at
    the same write) raises a one-line error, keeps the previous file and leaves no temp file."""
    code = f"""
import resource, signal, sys
import runtime
s = runtime.Stream(runtime.load({str(export_dir)!r}))
s.feed("To be")
path = {str(tmp_path / "a.state")!r}
s.save(path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
s.feed(" or not")
try:
    s.save(path)
except runtime.StateFileError as e:
    print("ERROR", e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ERROR cannot write") and "left as it was" in done.stdout
    restored = Stream(runtime.load(export_dir))
    restored.load(tmp_path / "a.state")
    assert restored.tokens_seen == len("To be")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("change, message", [
    (lambda h: h.update(tokens_seen="lots"), "tokens_seen 'lots'"),
    (lambda h: h.update(tokens_seen=-3), "tokens_seen -3"),
    (lambda h: h.update(arrays="nope"), "malformed array table"),
    (lambda h: h["arrays"][0].update(dtype="complex128"), "malformed array table"),
])
def test_hand_crafted_state_files_change_nothing(export_dir, tmp_path, change, message):
    model = runtime.load(export_dir)
    s = Stream(model)
    s.feed(PROMPT)
    s.save(tmp_path / "x.state")
    forge(tmp_path / "x.state", change)
    target = Stream(model)
    target.feed("To be")
    before = snapshot(target)
    with pytest.raises(StateFileError, match=message):
        target.load(tmp_path / "x.state")
    assert_unchanged(target, before)


# --- manifests ----------------------------------------------------------------------------------


def copy_export(export_dir, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    return copy


def rewrite(folder: Path, change, reseal: bool = True) -> None:
    data = json.loads((folder / "lmn.json").read_text(encoding="utf-8"))
    change(data)
    (folder / "lmn.json").write_text(manifest_text(data) if reseal else json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_one_changed_byte_in_the_manifest_is_refused(export_dir, tmp_path):
    copy = copy_export(export_dir, tmp_path)
    text = (copy / "lmn.json").read_text(encoding="utf-8")
    vocab = json.loads(text)["vocabulary"]["tokens"]
    swapped = vocab.replace("a", "@", 1)
    assert swapped != vocab
    (copy / "lmn.json").write_text(text.replace(json.dumps(vocab)[1:-1], json.dumps(swapped)[1:-1], 1), encoding="utf-8")
    with pytest.raises(ManifestError, match="modified after export"):
        runtime.load(copy)
    rewrite(copy, lambda d: d.pop("integrity"), reseal=False)
    with pytest.raises(ManifestError, match="no integrity check"):
        runtime.load(copy)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(model=[1, 2]), r"\$.model must be of type object"),
    (lambda d: d["files"]["model.onnx"].pop("sha256"), r"\$.files.model.onnx lacks the required field 'sha256'"),
    (lambda d: d.update(format_version="1"), r"format version '1' \(str\)"),
    (lambda d: d["graphs"][0].pop("inputs"), r"\$.graphs\[0\] lacks the required field 'inputs'"),
    (lambda d: d["files"].update({"../escape.onnx": {"sha256": "f" * 64, "bytes": 1}}), "outside the export folder"),
])
def test_malformed_manifests_are_one_line_errors(export_dir, tmp_path, change, message):
    copy = copy_export(export_dir, tmp_path)
    rewrite(copy, change)
    with pytest.raises(ManifestError, match=message):
        runtime.load(copy)


def test_a_wrong_graph_under_a_correct_sha_is_refused_at_load(export_dir, tmp_path):
    """The graphs' I/O is checked against the manifest before anything runs."""
    from runtime.manifest import file_digest, file_size

    copy = copy_export(export_dir, tmp_path)
    shutil.copy(copy / "prefill_32.onnx", copy / "model.onnx")
    rewrite(copy, lambda d: d["files"]["model.onnx"].update(sha256=file_digest(copy / "model.onnx"),
                                                            bytes=file_size(copy / "model.onnx")))
    with pytest.raises(ManifestError, match="model.onnx has inputs .*tokens.* declares"):
        runtime.load(copy)


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="bogus"), "precision must be one of"),
    (dict(threads=-1), "threads must be"),
    (dict(threads=0), "threads must be"),
    (dict(threads=1.5), "threads must be"),
    (dict(unknown="ignore"), "unknown must be one of"),
    (dict(backend="tpu"), "backend must be one of"),
])
def test_load_arguments_are_checked(export_dir, kwargs, message):
    with pytest.raises((ValueError, runtime.BackendError), match=message):
        runtime.load(export_dir, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=-0.5), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(seed=-1), "seed"), (dict(max_tokens=-1), "max_tokens"), (dict(stop=[1]), "stop"),
])
def test_generate_arguments_are_checked_before_anything_changes(export_dir, kwargs, message):
    s = Stream(runtime.load(export_dir))
    s.feed("To be")
    before = snapshot(s)
    args = {"max_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        s.generate(**args)  # raises at the call, not at the first next()
    assert_unchanged(s, before)


@pytest.mark.parametrize("ids", [[1.5], [True], ["a"], [-1], ["vocab_size"], [10**6]])
def test_feed_ids_refuses_what_is_not_a_token_id(export_dir, ids):
    s = Stream(runtime.load(export_dir))
    ids = [len(s.model.vocab) if i == "vocab_size" else i for i in ids]  # the first id past the end
    s.feed("To be")
    before = snapshot(s)
    with pytest.raises(ValueError, match="token ids"):
        s.feed_ids([3, *ids])
    assert_unchanged(s, before)


def test_generate_zero_feeds_nothing(export_dir):
    s = Stream(runtime.load(export_dir))
    assert list(s.generate(0)) == []
    assert s.tokens_seen == 0 and s.logits is None and sum(s.graph_calls.values()) == 0


def test_a_plain_stop_string_is_one_string(export_dir):
    model = runtime.load(export_dir)

    def run(stop):
        return continuation(model, 300, temperature=1.0, seed=11, stop=stop)

    free = run(())
    # a two-character stop string whose first character occurs earlier on its own
    i = next(i for i in range(10, len(free) - 1) if free[i] in free[:i] and free[i : i + 2] not in free[: i + 1])
    stop = free[i : i + 2]
    whole, tupled, chars = run(stop), run((stop,)), run(tuple(stop))
    assert whole == tupled == free[: i + 2]
    assert len(chars) < len(whole)  # split into characters, it would stop at the earlier one


def test_top_k_one_is_greedy(export_dir):
    model = runtime.load(export_dir)

    def run(**kw):
        return continuation(model, 60, **kw)

    greedy = run(temperature=0)
    assert run(temperature=1.0, top_k=1, seed=5) == greedy == run(temperature=3.0, top_k=1, seed=6)
    assert run(temperature=1.0, seed=5) != greedy  # negative control: unfiltered sampling differs


def test_tiny_temperatures_are_greedy_not_nan(export_dir):
    model = runtime.load(export_dir)

    def run(**kw):
        return continuation(model, 40, **kw)

    assert run(temperature=1e-320, seed=1) == run(temperature=0)


@pytest.mark.skipif(bool(os.environ.get("LMN_TEST_EMULATED")),
                    reason="Python's memory per token is no property of the CPU, and 20,000 tokens take ~2 minutes "
                           "under qemu; the host's run checks it")
def test_generate_cost_does_not_grow_with_output(export_dir):
    """One long call keeps O(1) memory per token: memory traced while generating 20,000 characters
    stays below what holding them would take (a 20,000-character str is ~20 KB)."""
    import tracemalloc

    s = Stream(runtime.load(export_dir))
    s.feed(PROMPT)
    chars = s.generate(20_000, temperature=1.0, seed=0, stop=("never-seen-stop",))
    for _ in range(1000):
        next(chars)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in chars:
        pass
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert s.decoded_tokens == 20_000
    assert grown < 8_000, f"generate held {grown:,} bytes more after 19,000 characters"


# --- bounded contexts (GPT) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from lmn_export.export import ExportOptions, export
    from lmn_export.parity_text import SAMPLE
    from models import GPT, GPTConfig
    from models.checkpoint import save
    from models.data import CharVocab

    root = tmp_path_factory.mktemp("gpt")
    vocab = CharVocab.from_text(SAMPLE)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), n_embd=16, n_head=2, n_layer=1, block_size=24)).eval()
    save(root / "ckpt", model, vocab)
    result = export(root / "ckpt", root / "gpt", ExportOptions(prefill_sizes=(), parity_tokens=8))
    assert result.passed
    return result.directory


def test_a_full_kv_cache_is_a_clear_error_not_a_crash(gpt_export):
    s = Stream(runtime.load(gpt_export))
    assert s.capacity == 24
    s.feed("To be, or not")
    before = snapshot(s)
    with pytest.raises(ContextFullError, match="at most 24 tokens"):
        s.feed(" to be: that is")  # 13 + 15 > 24: nothing is fed
    assert_unchanged(s, before)
    out = []
    with pytest.raises(ContextFullError, match="reset the stream"):
        for char in s.generate(100, temperature=0):
            out.append(char)
    assert len(out) == 24 - 13 and s.tokens_seen == 24
    s.reset()
    assert len("".join(s.generate(5, temperature=0))) == 5


# --- chat ---------------------------------------------------------------------------------------


def chat(export_dir, **kw) -> tuple[Chat, io.StringIO]:
    out = io.StringIO()
    settings = dict(max_tokens=30, temperature=0.8, top_k=None, top_p=None, seed=1, stop=())
    settings.update(kw)
    return Chat(Stream(runtime.load(export_dir)), out=out, **settings), out


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "abc"])
def test_chat_refuses_bad_temperatures_and_goes_on(export_dir, value):
    c, out = chat(export_dir)
    c.command(f"/temp {value}")
    assert "[error:" in out.getvalue() and c.temperature == 0.8
    c.reply("To be\n")
    assert c.stream.decoded_tokens == 30


def test_chat_temp_zero_is_greedy_and_reset_clears_the_state(export_dir):
    c, out = chat(export_dir)
    c.reply("Whether 'tis nobler\n")
    c.command("/temp 0")
    c.command("/reset")
    assert c.stream.tokens_seen == 0 and c.stream.logits is None
    assert all(not v.any() for v in c.stream.stepper.state.values())
    start = len(out.getvalue())
    c.reply("To be\n")
    reply = out.getvalue()[start:].rstrip("\n")
    fresh = Stream(c.stream.model)
    fresh.feed("To be\n")
    assert reply == "".join(fresh.generate(30, temperature=0))  # greedy, from an empty state


def test_ctrl_c_while_feeding_keeps_the_session(export_dir, monkeypatch):
    c, out = chat(export_dir)
    prefill, calls = c.stream.model.prefill, [0]

    def interrupted(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return prefill(*args)

    monkeypatch.setattr(c.stream.model, "prefill", interrupted)
    c.reply(PROMPT * 3)  # a long line, fed in prefill pieces: Ctrl-C lands between two of them
    assert calls[0] == 2
    assert "stopped while reading your text" in out.getvalue()
    c.reply("To be\n")  # the session goes on
    assert c.stream.decoded_tokens == 30


def test_chat_stop_applies_to_prompt_and_stdin(export_dir):
    done = subprocess.run([sys.executable, "-m", "runtime.chat", str(export_dir), "--max-tokens", "400", "--seed", "3",
                           "--temperature", "1.0", "--stop", "e"], input="To be", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n").endswith("e") and done.stdout.count("e") == 1


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "temperature"), (["--temperature", "-1"], "temperature"),
    (["--seed", "-1"], "--seed"), (["--top-k", "0"], "--top-k"), (["--top-p", "2"], "top_p"),
    (["--threads", "0"], "--threads"), (["--precision", "int2"], "--precision"),
    (["--precision", "int4"], "has no int4 ONNX graphs (it has fp32); re-export with lmn-export --quantize int4"),
])
def test_chat_bad_options_are_one_line(export_dir, args, message):
    from click.testing import CliRunner

    from runtime.chat import main

    result = CliRunner().invoke(main, [str(export_dir), "--prompt", "To be", *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_write_atomic_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f"
    write_atomic(path, b"old")

    class Boom(Exception):
        pass

    from runtime.atomic import atomic_path

    with pytest.raises(Boom):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise Boom
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []
