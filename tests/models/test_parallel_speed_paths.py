"""The parallel pass's chunked slot layout (`SlotLayout`): every position sees exactly its own slots.

tests/models/test_modes.py proves parallel == sequential on whole models; these tests pin the layout
itself at lengths around every chunk and level boundary, for several chunk sizes, without a model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import LMN, LMNConfig
from models.memory import LogMemory

CFG = LMNConfig(vocab_size=11, n_embd=1, n_head=1, n_layer=1, n_bank=2, max_levels=7)
LENGTHS = (1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 300)


def expected_codes(t: int, max_levels: int, n_bank: int) -> set[float]:
    """What position t sees: itself, and at each level i the banks of block floor((t+1)/2^i) - 1 (if any)."""
    codes = {float(1 + t)}
    for i in range(1, max_levels):
        block = (t + 1) // 2**i - 1
        codes |= {float(10**6 * i + 1000 * block + k + 1) for k in range(n_bank)} if block >= 0 else set()
    return codes


@pytest.mark.parametrize("chunk", [2, 4, 16, 64])
@pytest.mark.parametrize("n_bank", [1, 2])
def test_every_position_sees_exactly_its_slots(chunk, n_bank):
    """Slots carry codes (a token: its position; a summary: its level, block and bank); for every row, the
    codes of the slots `valid` keeps are exactly the ones the memory's definition names."""
    cfg = dataclasses.replace(CFG, n_bank=n_bank)
    memory = LogMemory(cfg)
    memory.chunk = chunk
    for T in LENGTHS:
        layout = memory.slot_layout(T, torch.device("cpu"))
        h = torch.arange(1, T + 1, dtype=torch.float64).view(1, T, 1)  # (1, T, E=1)
        tree = [torch.tensor([[[10**6 * i + 1000 * j + k + 1.0] for k in range(n_bank)] for j in range(T // 2**i)],
                             dtype=torch.float64).view(1, T // 2**i, n_bank, 1) for i in range(1, cfg.max_levels)]
        table = memory.slot_table(h, tree, layout)  # (1, R, 1)
        assert table.shape[1] == sum(layout.regions)
        slots = memory.chunk_slots(table.unsqueeze(-1), layout)  # (1, 1, P/C, S, 1)
        codes = slots.flatten(0, 2).squeeze(-1)  # (P/C, S): the same slots for every row of a chunk
        valid = layout.valid  # (P/C, C, S)
        for t in range(T):
            c, p = divmod(t + 1, layout.chunk)  # row t + 1 holds position t
            seen = codes[c][valid[c, p]].tolist()
            assert len(seen) == len(set(seen)), (T, t)  # no slot twice
            assert set(seen) == expected_codes(t, cfg.max_levels, n_bank), (chunk, n_bank, T, t)


def test_rows_by_chunk_and_back():
    memory = LogMemory(CFG)
    layout = memory.slot_layout(37, torch.device("cpu"))
    x = torch.randn(2, 37, 3, 5)  # (B, T, H, D)
    rows = memory.chunk_rows(x, layout)
    assert rows.shape == (2, 3, layout.rows // layout.chunk, layout.chunk, 5)
    assert rows.flatten(2, 3)[:, :, 0].abs().sum() == 0 and rows.flatten(2, 3)[:, :, 38:].abs().sum() == 0  # padding
    assert torch.equal(memory.positions(rows, layout), x)


def test_layout_built_once_per_length_and_device_except_while_tracing(monkeypatch):
    memory = LogMemory(CFG)
    first = memory.slot_layout(100, torch.device("cpu"))
    assert memory.slot_layout(100, torch.device("cpu")) is first  # cached (every layer, every call)
    assert memory.slot_layout(101, torch.device("cpu")) is not first
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # an export traces the layout's ops
    traced = memory.slot_layout(100, torch.device("cpu"))
    assert traced is not first and torch.equal(traced.valid, first.valid)


VARIANTS = [{"summarizer": s, "n_bank": b, "expand": e} for s in ("linear", "conv", "dwsep") for b in (1, 2) for e in (0, 2)]


@pytest.mark.parametrize("changes", VARIANTS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_training_pass_reaches_every_weight(changes):
    """forward + backward of the parallel pass (no state asked for): logits equal the state-returning
    pass exactly, and every parameter gets a finite, nonzero gradient (summarizer, expander, k/v included)."""
    torch.manual_seed(0)
    model = LMN(dataclasses.replace(CFG, n_embd=8, n_head=2, n_layer=2, **changes))
    tokens = torch.randint(11, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same ops with or without the state read off
        assert torch.equal(model(tokens), model(tokens, return_state=True)[0])
    model(tokens).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
