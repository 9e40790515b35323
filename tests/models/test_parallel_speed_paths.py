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


def code_tree(cfg: LMNConfig, T: int, start: int | None) -> list[torch.Tensor]:
    """Level entries as `LogMemory.tree` returns them, each slot a code: entry 0 the block before the window
    (block floor(p/2^i) - 1, as the start state holds it), then each block completed within the window."""
    p = start or 0
    tree = []
    for i in range(1, cfg.max_levels):
        first, last = p // 2**i - 1, (p + T) // 2**i - 1  # the start state's block, the last one completed
        count = (-(-T // 2**i) if start is not None else T // 2**i) + 1  # entries the pass holds (the last may be unused)
        blocks = [first + j if first + j <= last else -7 for j in range(count)]
        tree.append(torch.tensor([[[10**6 * i + 1000 * b + k + 1.0] for k in range(cfg.n_bank)] for b in blocks],
                                 dtype=torch.float64).view(1, count, cfg.n_bank, 1))
    return tree


@pytest.mark.parametrize("chunk", [2, 4, 16, 64])
@pytest.mark.parametrize("n_bank", [1, 2])
@pytest.mark.parametrize("start", [None, 0, 1, 5, 16, 37, 2**20 + 3], ids=lambda p: f"from-{p}")
def test_every_position_sees_exactly_its_slots(chunk, n_bank, start):
    """Slots carry codes (a token: its position; a summary: its level, block and bank); for every row, the
    codes of the slots the pass keeps (`valid`, and from a state the per-row `table_bias`) are exactly the
    ones the memory's definition names, from pointer 0 (None) and from a state at pointer `start`."""
    cfg = dataclasses.replace(CFG, n_bank=n_bank)
    memory = LogMemory(cfg)
    memory.chunk = chunk
    p = start or 0
    for T in LENGTHS:
        window = None if start is None else memory.window_start(torch.tensor([p]), T)
        layout = memory.slot_layout(T, torch.device("cpu"), from_state=window is not None)
        h = torch.arange(p + 1, p + T + 1, dtype=torch.float64).view(1, T, 1)  # (1, T, E=1)
        table = memory.slot_table(h, code_tree(cfg, T, start), layout, window)  # (1, R, 1)
        assert table.shape[1] == sum(layout.regions)
        codes = memory.chunk_slots(table.unsqueeze(-1), layout, window).flatten(0, 2).squeeze(-1)  # (P/C, W)
        holds = torch.ones_like(codes, dtype=torch.bool)  # (P/C, W): every slot of a chunk holds a block
        if window is not None:
            bias = memory.chunk_slots(window.table_bias.double()[..., None, None], layout, window)
            holds = torch.isfinite(bias.flatten(0, 2).squeeze(-1))
        rows = window.tokens[0].tolist() if window is not None else [t + 1 for t in range(T)]
        for t, row in enumerate(rows):
            c, r = divmod(row, layout.chunk)
            seen = codes[c][layout.valid[c, r] & holds[c]].tolist()
            assert len(seen) == len(set(seen)), (T, t)  # no slot twice
            assert set(seen) == expected_codes(p + t, cfg.max_levels, n_bank), (chunk, n_bank, T, t)


def test_rows_by_chunk_and_back():
    memory = LogMemory(CFG)
    layout = memory.slot_layout(37, torch.device("cpu"))
    x = torch.randn(2, 37, 3, 5)  # (B, T, H, D)
    rows = memory.chunk_rows(x, layout)
    assert rows.shape == (2, 3, layout.rows // layout.chunk, layout.chunk, 5)
    assert rows.flatten(2, 3)[:, :, 0].abs().sum() == 0 and rows.flatten(2, 3)[:, :, 38:].abs().sum() == 0  # padding
    assert torch.equal(memory.positions(rows, layout), x)
    window = memory.window_start(torch.tensor([0, 13]), 37)  # rows aligned per batch row: token 0 at row 1 + p mod C
    rows = memory.chunk_rows(x, memory.slot_layout(37, torch.device("cpu"), from_state=True), window)
    assert torch.equal(rows.flatten(2, 3)[1, :, 14], x[1, 0]) and rows.flatten(2, 3)[1, :, :14].abs().sum() == 0
    assert torch.equal(memory.positions(rows, layout, window), x)


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
