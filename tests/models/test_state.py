"""The recurrent state: fixed size forever, exact level arithmetic at any pointer."""

from __future__ import annotations

import pytest
import torch

from models import LMN, LMNConfig
from models.memory import level_flags, level_valid

TINY = LMNConfig(vocab_size=7, n_embd=8, n_head=2, n_layer=1, n_bank=2, max_levels=5)


@torch.inference_mode()
def test_state_is_fixed_after_100k_steps():
    torch.manual_seed(0)
    model = LMN(TINY).eval()
    state = model.init_state(1)
    tokens = torch.randint(7, (100_000, 1))
    _, first = model.step(tokens[0], state)
    state = first
    for t in range(1, 100_000):
        logits, state = model.step(tokens[t], state)
    assert state.memory.shape == first.memory.shape == (1, TINY.n_layer, TINY.n_slots, TINY.n_embd)
    assert state.memory.dtype == first.memory.dtype == torch.float32
    assert state.pointer.dtype == torch.int64 and state.pointer.tolist() == [100_000]
    assert torch.isfinite(state.memory).all() and torch.isfinite(logits).all()
    assert state.memory[:, :, 1:].abs().sum() > 0, "summary levels never filled"


POINTERS = [0, 1, 2, 3, 7, 2**24 - 3, 2**24 - 2, 2**24 - 1, 2**24, 2**24 + 1, 2**24 + 15,
            2**31 - 1025, 2**31 - 2, 2**31 - 1, 2**31, 2**40 - 1, 2**62 - 1]


@pytest.mark.parametrize("levels", [5, 20, 32])
def test_level_flags_exact_near_float_limits(levels):
    """float32 cannot tell 2^24 from 2^24+1; the flags must still match integer arithmetic."""
    sizes = torch.tensor([2**i for i in range(1, levels)], dtype=torch.int64)
    pointer = torch.tensor(POINTERS, dtype=torch.int64)
    flags = level_flags(pointer, sizes)
    valid = level_valid(pointer, sizes)
    for row, p in enumerate(POINTERS):
        assert flags[row].tolist() == [(p + 1) % 2**i == 0 for i in range(1, levels)], p
        assert valid[row].tolist() == [p + 1 >= 2**i for i in range(1, levels)], p


def test_step_at_large_pointers_updates_the_right_levels():
    """At pointer 2^24 - 1 (t+1 = 2^24) every level re-summarizes; at 2^24 only level 0 changes."""
    torch.manual_seed(0)
    model = LMN(TINY).eval()
    state = model.init_state(2)
    state.memory.normal_()
    state.pointer = torch.tensor([2**24 - 1, 2**24])
    with torch.no_grad():
        _, after = model.step(torch.tensor([1, 1]), state)
    changed = (after.memory != state.memory).any(-1)[:, 0]  # (B, S)
    assert changed[0].all()
    assert changed[1].tolist() == [True] + [False] * (TINY.n_slots - 1)
    assert after.pointer.tolist() == [2**24, 2**24 + 1]
