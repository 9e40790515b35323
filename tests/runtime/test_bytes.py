"""The byte vocabulary end to end: lmn-train --vocab bytes -> lmn-export -> runtime streams and lmn-chat.

Where the exact bytes a model emits matter, the stream's stepper is replaced by a script that puts
all the mass on the next byte of a given sequence (greedy decoding then emits exactly it): what is
under test there is the streaming decoder, not the weights. Token ids and states are compared
exactly (tolerance 0): the same graph on the same inputs gives the same floats.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import ByteVocab, ManifestError, StateFileError, Stream, UnknownCharacterError
from runtime.manifest import manifest_text

from ..conftest import committed_export
from .state_files import forge

WIDE = "é中😀"  # 2, 3 and 4 UTF-8 bytes


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory) -> Path:
    """A tinylogmem-32 trained 3 steps with --vocab bytes on text holding é, 中 and 😀, exported to ONNX
    (committed: tests/data/bytes, rebuilt by `python -m tests.data.build`)."""
    return committed_export(tmp_path_factory, "bytes")


def one_hot(byte: int) -> np.ndarray:
    logits = np.full(256, -1e9, dtype=np.float32)  # (V,)
    logits[byte] = 0.0
    return logits


def script(stream: Stream, monkeypatch, data: bytes) -> None:
    """Make greedy generation on `stream` emit `data` byte by byte (then spaces)."""
    upcoming = iter(data[1:])
    stream.logits = one_hot(data[0])
    monkeypatch.setattr(stream.stepper, "step", lambda token: one_hot(next(upcoming, 0x20)))


def yields(stream: Stream, max_tokens: int, **kwargs) -> list[tuple[str, int]]:
    """(character, tokens generated when it was yielded) for each yielded character."""
    return [(char, stream.decoded_tokens) for char in stream.generate(max_tokens, temperature=0, **kwargs)]


def test_export_records_the_byte_vocabulary(byte_export):
    manifest = json.loads((byte_export / "lmn.json").read_text(encoding="utf-8"))
    vocabulary = manifest["vocabulary"]
    assert vocabulary["kind"] == "bytes" and vocabulary["unit"] == "utf-8 byte" and "tokens" not in vocabulary
    assert manifest["model"]["vocab_size"] == 256 and vocabulary["token_ids"] == {"min": 0, "max": 255}
    assert vocabulary["start"] == {"text": "\n", "ids": [10], "when": vocabulary["start"]["when"]}
    assert manifest["parity"]["text"] == "Hamlet 3.1 sample (built in)"  # a byte vocabulary encodes it
    model = runtime.load(byte_export)
    assert isinstance(model.vocab, ByteVocab) and len(model.vocab) == 256


def test_parity_text_encodes_under_a_byte_vocabulary():
    """The export's built-in parity text is the Hamlet sample's UTF-8 bytes; a character vocabulary
    that lacks its characters (negative control) falls back to text the model samples."""
    pytest.importorskip("torch")
    from lmn_export.parity_text import SAMPLE, parity_ids
    from models import LMN, LMNConfig
    from models.data import ByteVocab as TrainByteVocab
    from models.data import CharVocab

    model = LMN(LMNConfig(vocab_size=2, n_embd=8, n_head=2, n_layer=1, n_bank=1, max_levels=4)).eval()
    ids, source = parity_ids(model, TrainByteVocab(), 10)
    assert ids == list(SAMPLE.encode("utf-8")) and source.startswith("Hamlet")
    ids, source = parity_ids(model, CharVocab(("a", "b")), 10)
    assert len(ids) == 10 and source.startswith("sampled from the model")


def test_text_is_fed_byte_by_byte(byte_export):
    """feed("é中😀") is the 9 UTF-8 bytes stepped one by one; another first character (negative control) differs."""
    model = runtime.load(byte_export)
    whole, by_bytes, other = Stream(model), Stream(model), Stream(model)
    whole.feed(WIDE)
    for byte in WIDE.encode("utf-8"):
        by_bytes.feed_ids([byte])
    other.feed("e" + WIDE[1:])
    assert whole.tokens_seen == by_bytes.tokens_seen == 9
    np.testing.assert_array_equal(whole.logits, by_bytes.logits)
    for name, value in whole.stepper.state.items():
        np.testing.assert_array_equal(value, by_bytes.stepper.state[name])
    assert not np.array_equal(whole.logits, other.logits)
    assert whole.decoder.pending == b""


def test_each_character_is_yielded_once_whole(byte_export, monkeypatch):
    s = Stream(runtime.load(byte_export))
    script(s, monkeypatch, WIDE.encode("utf-8"))
    assert yields(s, 9) == [("é", 2), ("中", 5), ("😀", 9)]  # after its last byte, not before
    assert s.decoder.pending == b"" and s.tokens_seen == 9
    # negative control: a byte on its own is not text, so yielding per token would be wrong
    assert [bytes([b]).decode("utf-8", errors="replace") for b in "中".encode()] == ["\ufffd"] * 3


def test_invalid_bytes_yield_replacement_and_generation_goes_on(byte_export, monkeypatch):
    s = Stream(runtime.load(byte_export))
    script(s, monkeypatch, "中".encode()[:2] + b"A" + b"\xff" + "é".encode())
    assert yields(s, 6) == [("\ufffd", 3), ("A", 3), ("\ufffd", 4), ("é", 6)]


def test_max_tokens_counts_bytes_and_a_cut_character_waits(byte_export, monkeypatch):
    s = Stream(runtime.load(byte_export))
    script(s, monkeypatch, "中!".encode() + "é".encode())
    assert yields(s, 2) == []  # 2 of 中's 3 bytes
    assert s.decoder.pending == "中".encode()[:2] and s.tokens_seen == 2
    assert yields(s, 2) == [("中", 3), ("!", 4)]
    assert yields(s, 1) == [] and s.decoder.pending == b"\xc3"
    s.feed("x")  # text fed after a cut character ends it: the decoder holds nothing
    assert s.decoder.pending == b""


def test_stop_strings_match_the_decoded_text(byte_export, monkeypatch):
    s = Stream(runtime.load(byte_export))
    script(s, monkeypatch, "ab中cd".encode())
    assert [c for c, _ in yields(s, 20, stop="中")] == ["a", "b", "中"]
    assert s.decoded_tokens == 5


def test_sampled_bytes_always_decode_and_the_decoder_stays_bounded(byte_export, monkeypatch):
    """3,000 tokens sampled from a barely trained model (broken sequences galore) never raise; the
    yielded text is exactly the UTF-8 decoding (errors replaced) of the bytes, less a held tail of <= 3."""
    s = Stream(runtime.load(byte_export))
    s.feed(WIDE)
    emitted, step = [], s.stepper.step
    monkeypatch.setattr(s.stepper, "step", lambda token: (emitted.append(token), step(token))[1])
    text = []
    for char in s.generate(3000, temperature=1.5, seed=0):
        assert len(char) == 1 and len(s.decoder.pending) <= 3
        text.append(char)
    assert len(emitted) == s.decoded_tokens == 3000
    whole = bytes(emitted)[: len(emitted) - len(s.decoder.pending)]
    assert "".join(text) == whole.decode("utf-8", errors="replace")
    assert "\ufffd" in text  # the model does emit broken sequences: the path above was exercised


def test_a_state_saved_mid_character_restores_it_exactly(byte_export, tmp_path):
    model = runtime.load(byte_export)
    s = Stream(model)
    s.feed("ab")
    s.feed_ids(list("中".encode()[:2]))  # the model is mid-character
    assert s.decoder.pending == b"\xe4\xb8"
    s.save(tmp_path / "mid.state")
    restored = Stream(model)
    restored.load(tmp_path / "mid.state")
    assert restored.decoder.pending == b"\xe4\xb8" and restored.tokens_seen == 4
    for name, value in s.stepper.state.items():
        np.testing.assert_array_equal(restored.stepper.state[name], value)
    assert "".join(restored.generate(40, seed=5)) == "".join(s.generate(40, seed=5))
    probe = Stream(model)
    probe.load(tmp_path / "mid.state")
    assert probe.decoder.decode(0xAD) == "中"
    assert Stream(model).decoder.decode(0xAD) == "\ufffd"  # negative control: without the held bytes


def test_state_files_without_pending_bytes_load_and_bad_ones_are_refused(byte_export, tmp_path):
    model = runtime.load(byte_export)
    s = Stream(model)
    s.feed("hi " + WIDE)
    s.save(tmp_path / "s.state")
    forge(tmp_path / "s.state", lambda h: h.pop("pending_bytes"))  # a file from before byte vocabularies
    old = Stream(model)
    old.load(tmp_path / "s.state")
    assert old.tokens_seen == s.tokens_seen and old.decoder.pending == b""
    for bad in ("ff", "zz", "e4b8ad", 5):  # a broken start, not hex, a whole character, not a string
        s.save(tmp_path / "b.state")
        forge(tmp_path / "b.state", lambda h: h.update(pending_bytes=bad))
        target = Stream(model)
        target.feed("x")
        with pytest.raises(StateFileError, match="unusable pending_bytes"):
            target.load(tmp_path / "b.state")
        assert target.tokens_seen == 1 and target.decoder.pending == b""
    shipped = runtime.load()  # a character vocabulary never holds bytes
    chars = Stream(shipped)
    chars.feed("To be")
    chars.save(tmp_path / "c.state")
    forge(tmp_path / "c.state", lambda h: h.update(pending_bytes="e4"))
    with pytest.raises(StateFileError, match="unusable pending_bytes"):
        Stream(shipped).load(tmp_path / "c.state")


def test_no_character_is_unknown_but_a_lone_surrogate_is(byte_export):
    s = Stream(runtime.load(byte_export))
    s.feed("\x00\t~ÿ€ﬁ" + WIDE)  # any text at all
    with pytest.raises(UnknownCharacterError, match="not a character"):
        s.feed("a\ud800b")
    lenient = Stream(runtime.load(byte_export, unknown="skip"))
    lenient.feed("a\ud800b")
    assert lenient.tokens_seen == 2


@pytest.mark.parametrize("change, message", [
    (lambda d: d["vocabulary"].update(tokens="abc"), "lists no tokens"),
    (lambda d: d["vocabulary"].update(kind="words"), r"vocabulary.kind must be one of \['chars', 'bytes'\]"),
    (lambda d: d["model"].update(vocab_size=255), "a byte vocabulary has 256 ids"),
])
def test_bad_byte_manifests_are_refused(byte_export, tmp_path, change, message):
    copy = tmp_path / "copy"
    shutil.copytree(byte_export, copy)
    data = json.loads((copy / "lmn.json").read_text(encoding="utf-8"))
    change(data)
    (copy / "lmn.json").write_text(manifest_text(data), encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        runtime.load(copy)


def test_a_character_vocabulary_marked_bytes_is_refused(tmp_path):
    """The shipped (character) manifest marked "bytes": its character list is refused, not ignored."""
    data = json.loads((runtime.DEFAULT_EXPORT / "lmn.json").read_text(encoding="utf-8"))
    copy = tmp_path / "copy"
    shutil.copytree(runtime.DEFAULT_EXPORT, copy)
    model = runtime.load(copy)
    assert model.vocab.kind == "chars" and model.vocab.chars == data["vocabulary"]["tokens"]  # control
    data["vocabulary"]["kind"] = "bytes"
    (copy / "lmn.json").write_text(manifest_text(data), encoding="utf-8")
    with pytest.raises(ManifestError, match="lists no tokens"):
        runtime.load(copy)


def test_chat_round_trips_a_wide_prompt(byte_export):
    chat = [sys.executable, "-m", "runtime.chat", str(byte_export), "--prompt", WIDE, "--json"]
    done = subprocess.run([*chat, "--max-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert (reply["prompt"], reply["continuation"], reply["tokens_seen"]) == (WIDE, "", 9)
    done = subprocess.run([*chat, "--max-tokens", "40", "--seed", "1", "--stop", ""], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["tokens_seen"] == 49 and isinstance(reply["continuation"], str)
