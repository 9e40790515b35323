"""lmn-train --carry: rows stream consecutive windows with the state carried, and resume bit for bit."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from models import LMN, LMNConfig
from models.carry import CARRY_LEVELS, CarriedRows
from models.checkpoint import load
from models.config import ConfigError
from models.train import CARRY_KEY

from .train_cli import QUICK, one_line_error, train

# 16-token windows, a stretch of 50 tokens: 3 windows, so 7 steps cross two stretch boundaries.
CARRY = ["--carry", "50"]


def test_rows_read_consecutive_windows_from_the_state_the_last_one_left():
    model = LMN(LMNConfig(vocab_size=11, n_embd=8, n_head=2, n_layer=1, n_bank=1, max_levels=8)).eval()
    split = np.arange(1000) % 11
    rows = CarriedRows(stretch=50, block=16, batch=2, micro=1, seed=0)
    assert rows.windows == 3
    x0, y0, empty = rows.batch_at(split, 0, 0, model)
    assert torch.equal(empty.pointer, torch.zeros(2, dtype=torch.int64)) and not empty.memory.any()
    _, after = model(x0, return_state=True, state=empty)
    rows.keep(0, after)
    x1, _, carried = rows.batch_at(split, 1, 0, model)
    assert torch.equal(x1[:, 0], y0[:, -1])  # the next window starts where the last one's targets ended
    assert torch.equal(carried.pointer, torch.full((2,), 16)) and torch.equal(carried.memory, after.memory)
    assert not carried.memory.requires_grad  # detached: no gradient crosses windows
    x3, _, fresh = rows.batch_at(split, 3, 0, model)  # step 3: a new stretch, from the empty state
    assert not fresh.pointer.any() and not fresh.memory.any()
    assert not torch.equal(x3, x0)  # another stretch (drawn by its number, not by the step)


def test_carry_resume_is_bit_identical_and_needs_the_saved_states(tmp_path, text_file):
    """4 steps then --resume to 7 (mid-stretch, then across a boundary) equals 7 steps straight; the same
    resume without the carried states in the checkpoint is refused (negative control: they are read)."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = ["--data", str(text_file), *QUICK, *CARRY]
    assert train(*args, "--steps", "7", "--out", str(straight)).exit_code == 0
    assert train(*args, "--steps", "4", "--out", str(broken)).exit_code == 0
    assert train(*args, "--steps", "7", "--out", str(broken), "--resume").exit_code == 0
    want, got = load(straight)[0].state_dict(), load(broken)[0].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    model, _, meta = load(straight)
    assert model.config.max_levels == CARRY_LEVELS and meta["training"]["carry"] == 50
    state = torch.load(io.BytesIO((straight / "optimizer.pt").read_bytes()), weights_only=True)
    [carried] = state[CARRY_KEY]  # one rank
    assert carried["memory"].shape[:2] == (1, 2) and carried["pointer"].tolist() == [[16, 16]]  # step 7: window 1
    dropped = tmp_path / "dropped"
    assert train(*args, "--steps", "4", "--out", str(dropped)).exit_code == 0
    from models.checkpoint import save

    model, vocab, meta = load(dropped)
    state = torch.load(io.BytesIO((dropped / "optimizer.pt").read_bytes()), weights_only=True)
    state.pop(CARRY_KEY)
    save(dropped, model, vocab, meta["training"], state)
    assert "carried states" in one_line_error(train(*args, "--steps", "7", "--out", str(dropped), "--resume"))


@pytest.mark.parametrize("first, then, message", [
    (CARRY, ["--carry", "60"], "trained with carried state"),
    ([], CARRY, "carried states"),
    (CARRY, ["--levels", "12"], "levels"),
])
def test_resume_with_other_carry_or_levels_is_refused(tmp_path, text_file, first, then, message):
    out = tmp_path / "run"
    assert train("--data", str(text_file), *QUICK, *first, "--steps", "3", "--out", str(out)).exit_code == 0
    assert message in one_line_error(train("--data", str(text_file), *QUICK, *then, "--steps", "6", "--out", str(out),
                                           "--resume"))


@pytest.mark.parametrize("args, message", [
    (["--carry", "20"], "fewer than two windows"),  # 20 tokens: one 16-token window and its targets
    (["--carry", "50", "--preset", "gpt2-32"], "has none"),
    (["--levels", "4", "--preset", "gpt2-32"], "GPT preset"),
    (["--carry", str(10**9)], "train split longer"),
    (["--levels", "63"], "--levels"),
])
def test_bad_carry_settings_are_one_line_errors(tmp_path, text_file, args, message):
    quick = [a for a in QUICK]
    if "--preset" in args:
        i = quick.index("--preset")
        del quick[i : i + 2]
    result = train("--data", str(text_file), *quick, *args, "--steps", "2", "--out", str(tmp_path / "run"))
    assert message in one_line_error(result)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_levels_sets_max_levels(tmp_path, text_file):
    out = tmp_path / "run"
    assert train("--data", str(text_file), *QUICK, "--levels", "13", "--steps", "1", "--out", str(out)).exit_code == 0
    assert load(out)[0].config.max_levels == 13
    with pytest.raises(ConfigError):
        CarriedRows(stretch=32, block=16, batch=1, micro=1, seed=0)  # 31 // 16 = 1 window


def test_init_starts_from_another_checkpoint_with_more_levels(tmp_path, text_file):
    """--init takes a checkpoint's weights and vocabulary into a new run (here with 16 levels and --carry);
    at a vanishing learning rate the weights stay the source's (negative control: a run without --init differs)."""
    source, tuned, fresh = tmp_path / "source", tmp_path / "tuned", tmp_path / "fresh"
    assert train("--data", str(text_file), *QUICK, "--steps", "2", "--out", str(source)).exit_code == 0
    args = ["--data", str(text_file), *QUICK, *CARRY, "--levels", "16", "--steps", "1", "--lr", "1e-30"]
    assert train(*args, "--init", str(source), "--out", str(tuned)).exit_code == 0
    assert train(*args, "--out", str(fresh)).exit_code == 0
    want, got, other = (load(p)[0] for p in (source, tuned, fresh))
    assert want.config.max_levels == 10 and got.config.max_levels == 16
    assert all(torch.allclose(want.state_dict()[k], got.state_dict()[k], atol=1e-12) for k in want.state_dict())
    assert not all(torch.allclose(want.state_dict()[k], other.state_dict()[k]) for k in want.state_dict())
    assert "--init starts a new run" in one_line_error(train(*args, "--init", str(source), "--out", str(tuned), "--resume"))


def test_carry_reset_starts_drawn_rows_from_the_empty_state():
    """--carry-reset: about that share of rows start a window from the empty state, the same rows on every run
    (a resume draws them again); 0 resets none (control); without --carry it is refused."""
    model = LMN(LMNConfig(vocab_size=11, n_embd=8, n_head=2, n_layer=1, n_bank=1, max_levels=8)).eval()
    split = np.arange(5000) % 11
    draws = []
    for reset in (0.0, 0.5, 0.5):
        rows = CarriedRows(stretch=1000, block=16, batch=64, micro=1, seed=0, reset=reset)
        x, _, state = rows.batch_at(split, 0, 0, model)
        _, after = model(x, return_state=True, state=state)
        rows.keep(0, after)
        _, _, carried = rows.batch_at(split, 1, 0, model)
        draws.append(carried.pointer == 0)
    assert not draws[0].any()  # no reset: every row carries its state
    assert 16 <= int(draws[1].sum()) <= 48 and torch.equal(draws[1], draws[2])  # about half, and reproducible
    with pytest.raises(ConfigError, match="--carry-reset applies"):
        from models.train import TrainSettings

        TrainSettings(carry_reset=0.1)
