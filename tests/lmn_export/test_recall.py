"""The recall probe: its texts say what they claim, its scoring reads the query as stepping does, and
its controls (memory zeroed, a window that ends before the key) are the answers they claim to be."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmn_export.bench import recall
from lmn_export.bench.command import main as bench_main
from lmn_export.bench.recall import (ALPHABET, DIGITS, FILLER, KEY, QUERY, RecallSettings, accuracy, bench_recall, gpt_query_logits,
                                     lmn_query_logits, probe_batch, training_text)
from models import GPT, LMN, GPTConfig, LMNConfig
from models.checkpoint import save
from models.data import CharVocab

VOCAB = CharVocab.from_text(ALPHABET)


def test_training_text_holds_episodes_whose_query_repeats_the_key():
    text = training_text(20_000, max_distance=300, seed=3)
    assert len(text) == 20_000 and set(text) <= set(ALPHABET)
    episodes = re.findall(r"#(\d)([^#?\d]*)\?(\d)", text)
    assert len(episodes) > 50
    assert all(key == value for key, _, value in episodes)  # the answer is always the digit written
    distances = [len(f) for _, f, _ in episodes]
    assert max(distances) <= 300 and min(distances) <= 10  # log-uniform: short ones are common
    assert training_text(20_000, 300, 3) == text and training_text(20_000, 300, 4) != text  # the seed decides


def test_probe_streams_ask_for_the_digit_at_the_distance_given():
    streams, queries, digits = probe_batch(100, 30, np.random.default_rng(0))
    assert len({len(s) for s in streams}) == 1  # one batch: equal lengths
    leads = set()
    for s, q, d in zip(streams, queries, digits):
        assert s[q] == QUERY and s.count(QUERY) == 1 and s.count(KEY) == 1
        key = s.index(KEY)
        assert s[key + 1] == DIGITS[d] and q - (key + 2) == 100  # exactly 100 filler characters between digit and query
        assert set(s[key + 2 : q]) <= set(FILLER) and s[key + 2 : q] in FILLER * 5  # the sentence, repeated
        leads.add(key)
    assert len(leads) > 10  # the key falls at many alignments


def test_accuracy_reads_the_ten_digits_only():
    ids = np.asarray(VOCAB.encode(DIGITS))
    logits = np.zeros((2, len(VOCAB)))
    logits[:, VOCAB.encode("a")[0]] = 9.0  # a filler character outscoring every digit does not count
    logits[0, ids[3]], logits[1, ids[5]] = 1.0, 1.0
    assert accuracy(logits, ids, np.array([3, 4])) == 0.5


@pytest.fixture
def tiny_lmn():
    torch.manual_seed(0)
    return LMN(LMNConfig(vocab_size=len(VOCAB), n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=12)).eval()


def test_lmn_query_logits_equal_stepping_and_zeroing_removes_the_memory(tiny_lmn, monkeypatch):
    """Parallel mode in chunks, then the tail from per-row lengths, reads each row's query as stepping does
    (1e-4: fp32 over ~700 positions). The control: the memory zeroed just before the query equals a step from a
    zero memory at the query's pointer; negative control: it differs from the true answer."""
    monkeypatch.setattr(recall, "PASS_TOKENS", 3 * 100)  # passes of 100 tokens: the carried state crosses boundaries
    streams, queries, _ = probe_batch(150, 3, np.random.default_rng(1))
    tokens = torch.tensor([VOCAB.encode(s) for s in streams])
    answer, zeroed = lmn_query_logits(tiny_lmn, tokens, queries)
    with torch.no_grad():
        for r in range(3):
            state = tiny_lmn.init_state(1)
            for t in range(int(queries[r])):
                _, state = tiny_lmn.step(tokens[r : r + 1, t], state)
            stepped, _ = tiny_lmn.step(tokens[r : r + 1, queries[r]], state)
            np.testing.assert_allclose(answer[r], stepped[0].numpy(), atol=1e-4)
            state.memory.zero_()
            empty, _ = tiny_lmn.step(tokens[r : r + 1, queries[r]], state)
            np.testing.assert_allclose(zeroed[r], empty[0].numpy(), atol=1e-5)
            assert np.abs(zeroed[r] - answer[r]).max() > 1e-3


def test_gpt_reads_the_window_that_ends_at_the_query():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=len(VOCAB), n_embd=16, n_head=2, n_layer=2, block_size=64)).eval()
    streams, queries, _ = probe_batch(10, 6, np.random.default_rng(2))
    assert queries.min() < 63 < queries.max()  # some windows start at the stream's start: shorter than 64
    tokens = torch.tensor([VOCAB.encode(s) for s in streams])
    logits = gpt_query_logits(gpt, tokens, queries)
    with torch.no_grad():
        r = int(queries.argmin())
        np.testing.assert_allclose(logits[r], gpt(tokens[r : r + 1, : queries[r] + 1])[0, -1].numpy(), atol=1e-5)
    with torch.no_grad():
        q = int(queries[1])
        own = gpt(tokens[1:2, q - 63 : q + 1])[0, -1].numpy()
        shorter = gpt(tokens[1:2, q - 15 : q + 1])[0, -1].numpy()
    np.testing.assert_allclose(logits[1], own, atol=1e-5)
    assert np.abs(logits[1] - shorter).max() > 1e-3  # negative control: another window gives other logits


def test_recall_section_scores_checkpoints_and_skips_a_vocabulary_without_the_probe(tmp_path, tiny_lmn):
    torch.manual_seed(0)
    save(tmp_path / "lmn", tiny_lmn, VOCAB)
    save(tmp_path / "gpt", GPT(GPTConfig(vocab_size=len(VOCAB), n_embd=16, n_head=2, n_layer=2, block_size=32)).eval(), VOCAB)
    other = CharVocab.from_text("abc")
    save(tmp_path / "other", LMN(LMNConfig(vocab_size=3, n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=4)), other)
    lines = []
    rows = bench_recall(RecallSettings(checkpoints=tuple(str(tmp_path / n) for n in ("lmn", "gpt", "other")),
                                       distances=(8, 64), probes=20), lines.append)
    assert [r["model"] for r in rows] == ["LMN, 12 levels", "GPT-2, window of 32"]
    assert any("other skipped" in line and "probe" in line for line in lines)
    lmn, gpt = rows
    assert [e["distance"] for e in lmn["by_distance"]] == [8, 64]
    for e in lmn["by_distance"]:
        assert 0 <= e["accuracy"] <= 1 and 0 <= e["accuracy_memory_zeroed"] <= 1
    assert lmn["state_bytes"] == 2 * (1 + 11 * 2) * 16 * 4 + 8
    assert gpt["by_distance"][1]["kv_cache_bytes"] == 2 * 2 * 66 * 16 * 4


def test_bench_recall_command_needs_checkpoints_and_plots_by_distance(tmp_path, tiny_lmn):
    runner = CliRunner()
    refused = runner.invoke(bench_main, ["--sections", "recall"])
    assert refused.exit_code == 2 and "--recall-checkpoints" in refused.output
    bad = runner.invoke(bench_main, ["--sections", "recall", "--recall-checkpoints", str(tmp_path), "--recall-distances", "0"])
    assert bad.exit_code == 2
    save(tmp_path / "lmn", tiny_lmn, VOCAB)
    args = ["--sections", "recall", "--recall-checkpoints", str(tmp_path / "lmn"), "--recall-distances", "16,4",
            "--recall-probes", "5"]
    done = runner.invoke(bench_main, [*args, "--json", str(tmp_path / "r.json")])
    assert done.exit_code == 0, done.output
    assert "recall: accuracy" in done.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert [e["distance"] for e in result["recall"][0]["by_distance"]] == [4, 16]
    pytest.importorskip("matplotlib", reason="the charts need the [bench] install")
    plotted = runner.invoke(bench_main, [*args, "--plot", str(tmp_path / "charts")])
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "charts" / "recall.png").stat().st_size > 1000


def test_corpus_command_writes_once_and_never_overwrites(tmp_path):
    out = tmp_path / "probe.txt"
    runner = CliRunner()
    done = runner.invoke(recall.main, [str(out), "--chars", "5000", "--max-distance", "64"])
    assert done.exit_code == 0 and len(out.read_text()) == 5000
    out.write_text("mine")
    again = runner.invoke(recall.main, [str(out), "--chars", "5000"])
    assert again.exit_code == 1 and "exists" in again.output and out.read_text() == "mine"
