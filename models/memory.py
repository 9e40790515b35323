"""The logarithmic memory: one tree of summaries per bank, built in parallel or one step at a time.

Shape letters: B batch, T time, L levels (max_levels), K banks, E width, S nodes (1 + (L-1)*K),
X expander slots per summary node (1 + expand), A attention slots (1 + (L-1)*K*X); in the parallel
pass (`SlotLayout`): R slot-table rows, P rows (T + 1 padded to the chunk), C rows per chunk, W
slots a chunk sees.

At position t, level i holds the summary of tokens [(k-1)*2^i, k*2^i - 1], k = floor((t+1)/2^i),
and is empty (zeros, masked) while k = 0. Level 0 is the token's own (normalized) input.
Both modes call the same `summarizer` on the same operands, so they agree to float rounding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMNConfig
from .summarizers import Expander, make_summarizer


def level_flags(pointer: torch.Tensor, block_sizes: torch.Tensor) -> torch.Tensor:
    """Which levels a step at position `pointer` re-summarizes: 2^i divides pointer + 1.

    pointer: (B,) int64; block_sizes: (N,) int64 (e.g. 2^1..2^(L-1)). Returns (B, N) bool.
    `remainder` is exact for any int64 and exports to ONNX and Core ML (bitwise ops do not).
    """
    return torch.remainder(pointer.unsqueeze(-1) + 1, block_sizes) == 0


class StepMasks(NamedTuple):
    """Per-step values shared by every layer, from the pointer alone.

    changed: (B, S*E) bool, which memory node elements a row replaces this step (level 0 always);
             None when every row re-summarizes the same levels.
    bias:    (B, 1, A) float, 0 for attention slots holding a complete block, -inf for empty ones;
             None when every slot is known to be valid.
    """

    changed: torch.Tensor | None
    bias: torch.Tensor | None


def levels_changed(pointer: torch.Tensor, block_sizes: torch.Tensor) -> torch.Tensor:
    """How many summary levels each row re-summarizes at `pointer`: (B,) int64, min(trailing zeros of pointer+1, L-1)."""
    return level_flags(pointer, block_sizes).sum(-1)


def level_valid(position: torch.Tensor, block_sizes: torch.Tensor) -> torch.Tensor:
    """Whether a level of block size 2^i holds a complete block at `position`: position + 1 >= 2^i.

    position: (...) int64; block_sizes: (N,) int64 -> (..., N) bool.
    """
    return position.unsqueeze(-1) + 1 >= block_sizes


# Rows per chunk in the parallel pass (a power of two): larger chunks copy fewer repeated slots,
# smaller ones score fewer masked slots (see `SlotLayout`). Training on CPU, 16 and 8 tie at widths
# 32 and 128 (within noise) and 32 is slower at width 32.
CHUNK = 16


class SlotLayout(NamedTuple):
    """Where the parallel pass finds every position's attention slots, for one sequence length T.

    Rows: row r stands for position r - 1; row 0 and the rows past T are padding, P rows in all
    (T + 1 rounded up to a multiple of the chunk C). Row r sees level i's block floor(r / 2^i) - 1
    (none while that is negative). So the C rows of a chunk see C / 2^i consecutive blocks of a
    "chunked" level (2^i <= C), and one block of a "repeated" level (2^i > C): a chunk's slot set
    is its own C level-0 rows plus KX * (C - 1 + repeated levels) summary slots, W in all, and
    one (C, D) @ (D, W) product per chunk and head scores every level at once; `valid` masks the
    slots a row does not see.

    The slot table (`LogMemory.slot_table`), region after region: level 0 (P rows, row r = the
    token at position r - 1), each chunked level i (P / 2^i entries of KX rows: entry e = block
    e - 1, entry 0 and those past the last block zeros), then each repeated level (its blocks
    plus entry 0). Levels whose block size exceeds T have no block anywhere and are left out
    (a masked slot weighs exactly 0, so leaving it out changes nothing).
    """

    length: int  # T
    rows: int  # P
    chunk: int  # C
    levels: int  # summary levels with a complete block within T: 1..levels
    chunked: int  # levels 1..chunked are chunked, chunked+1..levels repeated
    regions: tuple[int, ...]  # table rows: level 0, each chunked level, all repeated levels together
    repeated: torch.Tensor | None  # (P/C * (levels - chunked) * KX,) int64: rows of the repeated region, by chunk
    valid: torch.Tensor  # (P/C, C, W) bool: which of its chunk's slots each row sees
    from_state: bool  # rows are aligned per batch row to its start pointer (see `WindowStart`)


def window_blocks(length: int, level: int, from_state: bool) -> int:
    """Most level-`level` blocks that a window of `length` tokens completes: floor(T / 2^i) from pointer 0,
    ceil(T / 2^i) from any pointer."""
    size = 2**level
    return -(-length // size) if from_state else length // size


def window_rows(length: int, chunk: int, from_state: bool) -> int:
    """P: row 0, T token rows (after up to C-1 rows of alignment from a state), rounded up to the chunk."""
    return -(-(length + (chunk if from_state else 1)) // chunk) * chunk


@functools.lru_cache(maxsize=32)
def _slot_layout(length: int, chunk: int, slots_per_block: int, max_levels: int, device: torch.device,
                 anchor: torch.Tensor | None = None, from_state: bool = False) -> SlotLayout:
    """`SlotLayout` for T = length, C = chunk, KX = slots_per_block (banks * expander slots).

    From pointer 0 (`from_state` False) row r is position r - 1 and entry 0 of every level is empty,
    so the mask says which slots hold a block. From a state, rows are aligned per batch row and every
    level may hold the state's node: the mask only says which of its chunk's slots a row sees, and
    `WindowStart.table_bias` says which slots hold a block.
    Built from Python integers and aranges only: divisions are of numbers below P (< 2^24)."""
    T, C, KX = length, chunk, slots_per_block
    levels = max_levels - 1 if from_state else min(max_levels - 1, T.bit_length() - 1)  # from 0: 2^i <= T
    chunked = min(C.bit_length() - 1, levels)
    P = window_rows(T, C, from_state)
    repeated_levels = range(chunked + 1, levels + 1)
    regions = (P, *(P // 2**i * KX for i in range(1, chunked + 1)),
               sum((window_blocks(T, i, from_state) + 1) * KX for i in repeated_levels))
    # Per slot of a chunk: its level's block size, its block among the chunk's, and the first entry holding a block.
    span, local, first = [1] * C, list(range(C)), [0] * C  # level 0: the chunk's own rows, always valid
    for i in range(1, levels + 1):
        blocks = C // 2**i if i <= chunked else 1
        span += [2**i] * (blocks * KX)
        local += [u for u in range(blocks) for _ in range(KX)]
        first += [0 if from_state else 1] * (blocks * KX)
    span, local, first = (torch.tensor(v, dtype=torch.int64, device=device) for v in (span, local, first))  # (W,)
    start = torch.arange(P // C, device=device).view(-1, 1, 1) * C  # (P/C, 1, 1): each chunk's first row
    if anchor is not None:
        start = start + anchor  # a zero the exporter cannot fold: the mask is computed in the graph
    row = start + torch.arange(C, device=device).view(1, -1, 1)  # (P/C, C, 1)
    entry = torch.div(start, span, rounding_mode="floor") + local  # (P/C, 1, W): the entry a slot holds
    valid = torch.logical_and(torch.div(row, span, rounding_mode="floor") == entry, entry >= first)  # (P/C, C, W)
    repeated, offset = [], 0
    for i in repeated_levels if not from_state else ():  # from a state: per batch row (`WindowStart`)
        entry = torch.div(start.view(-1, 1), 2**i, rounding_mode="floor")  # (P/C, 1)
        repeated.append(offset + entry * KX + torch.arange(KX, device=device))  # (P/C, KX)
        offset += (T // 2**i + 1) * KX
    repeated = torch.cat(repeated, dim=1).flatten() if repeated else None
    return SlotLayout(T, P, C, levels, chunked, regions, repeated, valid, from_state)


def block_entry(rem: torch.Tensor, offset, size: int, bound: int) -> torch.Tensor:
    """floor((rem + offset) / size), exact for 0 <= rem < size and 0 <= offset < bound (int64 of any size).

    The ONNX exporter divides int64 through float32, exact below 2^24 only: where size >= bound the
    answer is 0 or 1 and is a comparison; elsewhere rem + offset < 2 * bound, a small number.
    """
    x = rem + offset
    if size >= bound:
        return (x >= size).long()
    return small_floor_div(x, size)


def small_floor_div(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """floor(x / divisor) for int64 x in [0, 2^24): exact through float32, where the ONNX exporter and Core
    ML divide; cast back to integers so that it can index (Core ML's floor division returns floats)."""
    return torch.div(x, divisor, rounding_mode="floor").to(torch.int32).to(torch.int64)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of each batch row by its own index: x (B, N, ...), index (B, M) in [0, N) -> (B, M, ...).

    One gather of whole rows from the flattened batch (an ONNX Gather with a (B*M,) index), not a
    gather of elements through a full-size expanded index."""
    B, N = x.shape[0], int(x.shape[1])
    flat = index + torch.arange(B, device=index.device).view(-1, 1) * N  # (B, M)
    return x.flatten(0, 1).index_select(0, flat.flatten()).unflatten(0, (B, -1))


def clamp_index(index: torch.Tensor, most: int) -> torch.Tensor:
    """An int64 index clamped to [0, most], in integers (Core ML converts `clamp` through float)."""
    zeros = torch.zeros_like(index)
    return torch.where(index < 0, zeros, torch.where(index > most, zeros + most, index))


def holds_bias(holds: torch.Tensor, slots: int) -> torch.Tensor:
    """(B, n) bool, whether an entry holds a block -> (B, n * slots) float: 0 for its slots, -inf for an empty one's.

    Full-shape `where` operands and no repeat_interleave: both convert to Core ML as written."""
    ones = holds.to(torch.float32)
    bias = torch.where(holds, ones * 0, ones - float("inf"))  # (B, n)
    return bias.unsqueeze(-1).expand(-1, -1, slots).flatten(1)


class WindowStart(NamedTuple):
    """Where a parallel pass over T tokens starts: each row's pointer and how its rows align, computed
    once for every layer from the pointer alone (remainders and small numbers: exact at any pointer).

    Row r of batch row b stands for position base_b + r - 1, base_b = p_b - (p_b mod C), so each
    chunk covers C positions aligned like the step's blocks; token j sits at row (p_b mod C) + 1 + j.
    Level i's entries (from `LogMemory.tree`): entry 0 is the start state's level-i node (block
    floor(p/2^i) - 1), entry j the j-th block completed within the window.
    """

    rows: torch.Tensor  # (B, P) int64: 1 + the token a row holds, 0 for rows holding none (into [zero, T tokens, zero])
    tokens: torch.Tensor  # (B, T) int64: the row holding each token
    shift: torch.Tensor  # (B, L-1) bool: level i pairs its level i-1 entries (1, 2), (3, 4)... (else (0, 1), (2, 3)...)
    remainders: torch.Tensor  # (B, L-1) int64: p mod 2^i
    chunked: list[torch.Tensor]  # per chunked level i: (B, P/2^i) int64, the entry each region row holds (may be < 0)
    repeated: torch.Tensor | None  # (B, P/C * repeated levels * KX) int64: rows of the repeated region, by chunk
    table_bias: torch.Tensor  # (B, R) float: 0 for slot-table rows holding a block, -inf for the others


class LogMemory(nn.Module):
    """Builds memory nodes and turns them into attention slots with a validity mask."""

    def __init__(self, cfg: LMNConfig):
        super().__init__()
        self.n_bank = cfg.n_bank
        self.n_embd = cfg.n_embd
        self.max_levels = cfg.max_levels
        self.summarize = make_summarizer(cfg)
        self.expander = Expander(cfg.n_bank, cfg.n_embd, cfg.expand) if cfg.expand else None
        self.slots_per_node = 1 + cfg.expand  # X
        self.chunk = CHUNK  # rows per chunk of the parallel pass (a plain attribute: no weights depend on it)
        sizes = torch.tensor([2**i for i in range(1, cfg.max_levels)], dtype=torch.int64)
        self.register_buffer("block_sizes", sizes, persistent=False)  # (L-1,)
        # Block size behind each attention slot (1 for level 0, which is always valid).
        per_slot = torch.cat([torch.ones(1, dtype=torch.int64), sizes.repeat_interleave(cfg.n_bank * (1 + cfg.expand))])
        self.register_buffer("slot_block_sizes", per_slot, persistent=False)  # (A,)
        per_node = torch.cat([torch.ones(1, dtype=torch.int64), sizes.repeat_interleave(cfg.n_bank)])
        self.register_buffer("node_block_sizes", per_node, persistent=False)  # (S,)

    def tree(self, h: torch.Tensor, nodes: torch.Tensor | None = None, start: WindowStart | None = None) -> list[torch.Tensor]:
        """Parallel mode: per level i = 1..L-1, the level's entries (B, 1 + n_i, K, E): entry 0 the
        node the window starts with (the start state's; zeros from the empty state), entry j the
        j-th block completed within the window (n_i = `window_blocks`).

        h: (B, T, E); nodes: (B, S, E), the start state's nodes of this layer, with `start` (None:
        the empty state at pointer 0). A block is summarize(its older half, its newer half); from
        pointer 0 block j covers tokens [j*2^i, (j+1)*2^i - 1] and a level's nodes 2j, 2j+1 are one
        row of a view (no pair is copied). From a state, a level pairs its previous level's entries
        from entry 0 or 1 by the pointer's bit i-1, so a block straddling the start takes its older
        half from the state. Level 1's tokens are shared by every bank, so it uses the token-pair
        weight, as the step does.
        """
        B, T, E = h.shape
        K = self.n_bank
        if self.max_levels == 1:
            return []
        weight, bias = self.summarize.pair_affine()  # once for every level
        affine = (self.summarize.token_pair_weight(weight), bias)
        level = h if start is None else torch.cat([nodes[:, :1], h], dim=1)  # level 0: (B, T, E) or entries (B, 1+T, E)
        levels = []
        for i in range(1, self.max_levels):
            n = window_blocks(int(T), i, start is not None)
            if start is None:
                pair = level[:, : 2 * n]  # nodes 2j, 2j+1 side by side: (B, 2n, E or K*E)
            else:
                level = F.pad(level, (0, 0, 0, max(0, 1 + 2 * n - int(level.shape[1]))))  # room for either pairing
                shift = start.shift[:, i - 1].view(B, 1, 1)
                pair = torch.where(shift, level[:, 1 : 1 + 2 * n], level[:, : 2 * n])  # (B, 2n, E or K*E)
            level = self.summarize.pairs(pair.reshape(B, n, 2 * int(pair.shape[-1])), affine)  # (B, n, K*E)
            before = nodes[:, 1 + (i - 1) * K : 1 + i * K].flatten(1) if start is not None else level.new_zeros(B, K * E)
            level = torch.cat([before.unsqueeze(1), level], dim=1)  # (B, 1+n, K*E): entry 0 first
            levels.append(level.unflatten(-1, (K, E)))  # (B, 1+n, K, E)
            if start is None:
                level = level[:, 1:]  # from pointer 0 entry 0 is empty: pairs start at the first block
            affine = (weight, bias)
        return levels

    def slot_layout(self, length: int, device: torch.device, anchor: torch.Tensor | None = None,
                    from_state: bool = False) -> SlotLayout:
        """The parallel pass's slot layout for sequences of `length` tokens (see `SlotLayout`), from
        pointer 0 or (`from_state`) from any state; built once per (length, device) and kept, except
        while tracing (then built in the graph).

        anchor: while tracing, a () int64 zero computed from a graph input: adding it keeps the
        exporter from folding the (P/C, C, W) mask into a float constant per layer (4 MB at T=4096).
        """
        args = (int(length), self.chunk, self.n_bank * self.slots_per_node, self.max_levels, device)  # int: a constant when traced
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return _slot_layout.__wrapped__(*args, anchor=anchor, from_state=from_state)
        return _slot_layout(*args, from_state=from_state)

    def window_start(self, pointer: torch.Tensor, length: int) -> WindowStart:
        """How a parallel pass of `length` tokens from a state at `pointer` (B,) aligns (see `WindowStart`)."""
        B, T, C = pointer.shape[0], int(length), self.chunk  # int: the layout is a constant when traced
        KX, device = self.n_bank * self.slots_per_node, pointer.device
        layout = self.slot_layout(T, device, from_state=True)
        P = layout.rows
        offset = torch.remainder(pointer, C).view(B, 1)  # (B, 1): rows of alignment before the first token
        token = torch.arange(P, device=device).view(1, P) - offset - 1  # (B, P): the token each row holds
        rows = torch.where(torch.logical_and(token >= 0, token < T), token + 1, torch.zeros_like(token))  # no bitwise ops: Core ML
        tokens = offset + 1 + torch.arange(T, device=device).view(1, T)  # (B, T)
        remainders = torch.remainder(pointer.unsqueeze(-1), self.block_sizes)  # (B, L-1): p mod 2^i
        shift = remainders < self.block_sizes // 2  # bit i-1 of p is 0: the level's first block starts in the window
        filled = pointer.unsqueeze(-1) >= self.block_sizes  # (B, L-1): the state's level-i node holds a block
        biases = [torch.zeros(B, P, device=device)]  # level 0: every row holds a token or a zero row, seen by itself
        chunked = []
        for i in range(1, layout.chunked + 1):  # 2^i <= C: region row e is in-window group e, entry e - (offset // 2^i)
            entry = torch.arange(P // 2**i, device=device).view(1, -1) - small_floor_div(offset, 2**i)
            chunked.append(entry)  # (B, P/2^i)
            block = torch.logical_and(entry >= 1, entry <= window_blocks(T, i, True))
            holds = torch.logical_or(block, torch.logical_and(entry == 0, filled[:, i - 1 : i]))
            biases.append(holds_bias(holds, KX))
        repeated, region = [], 0
        chunk_start = torch.arange(P // C, device=device).view(1, -1) * C  # (1, P/C)
        for i in range(layout.chunked + 1, layout.levels + 1):  # 2^i > C: one block per chunk
            n = window_blocks(T, i, True)
            entry = clamp_index(block_entry(remainders[:, i - 1 : i] - offset, chunk_start, 2**i, P), n)  # (B, P/C)
            repeated.append(region + entry.unsqueeze(-1) * KX + torch.arange(KX, device=device))  # (B, P/C, KX)
            holds = torch.cat([filled[:, i - 1 : i], torch.ones(B, n, dtype=torch.bool, device=device)], dim=1)
            biases.append(holds_bias(holds, KX))  # (B, (1+n)*KX)
            region += (1 + n) * KX
        repeated = torch.cat(repeated, dim=-1).flatten(1) if repeated else None  # (B, P/C * levels * KX), by chunk
        return WindowStart(rows, tokens, shift, remainders, chunked, repeated, torch.cat(biases, dim=1))

    def slot_table(self, h: torch.Tensor, tree: list[torch.Tensor], layout: SlotLayout,
                   start: WindowStart | None = None) -> torch.Tensor:
        """Every attention slot of a parallel pass, once, as rows ready for one projection (see `SlotLayout`).

        h: (B, T, E), tree from `tree(h, ...)`, `start` for a pass from a state -> (B, sum(layout.regions), E).
        Rows that hold no block are zeros or a level's empty entry 0; every slot they stand in for is masked.
        """
        B, T, E = h.shape
        KX, P = self.n_bank * self.slots_per_node, layout.rows
        levels = tree[: layout.levels]  # [(B, 1+n_i, K, E)]
        counts = [level.shape[1] for level in levels]  # 1 + n_i
        if levels and self.expander is not None:  # every level widened at once: (B, sum(1+n_i), KX, E), split back
            levels = self.widen(torch.cat(levels, dim=1)).split(counts, dim=1)
        if start is None:  # row r = position r - 1
            pads = [P // 2**i - n if i <= layout.chunked else 0 for i, n in enumerate(counts, start=1)]
            zeros = h.new_zeros(B, max([1, P - T - 1, *pads]), KX, E)
            pieces = [zeros[:, :1, 0], h, zeros[:, : P - T - 1, 0]]  # level 0
            pieces += [torch.cat([nodes, zeros[:, :pad]], dim=1).flatten(1, 2) for nodes, pad in zip(levels, pads)]
            return torch.cat(pieces, dim=1)
        pieces = [take_rows(F.pad(h, (0, 0, 1, 1)), start.rows)]  # level 0: (B, P, E)
        for i, (nodes, entry) in enumerate(zip(levels, start.chunked), start=1):  # region row e: entry e - offset // 2^i
            pieces.append(take_rows(nodes, clamp_index(entry, int(nodes.shape[1]) - 1)).flatten(1, 2))  # (B, P/2^i * KX, E)
        pieces += [nodes.flatten(1, 2) for nodes in levels[layout.chunked :]]  # repeated levels: all entries
        return torch.cat(pieces, dim=1)

    @staticmethod
    def chunk_rows(x: torch.Tensor, layout: SlotLayout, start: WindowStart | None = None) -> torch.Tensor:
        """Per-position vectors as rows by chunk: (B, T, H, D) -> (B, H, P/C, C, D), padding rows zeros,
        in one copy."""
        if start is None:  # row r = position r - 1
            rows = F.pad(x.transpose(1, 2), (0, 0, 1, layout.rows - layout.length - 1))  # (B, H, P, D)
        else:
            rows = take_rows(F.pad(x, (0, 0, 0, 0, 1, 1)), start.rows).transpose(1, 2)  # (B, P, H, D) -> (B, H, P, D)
        return rows.unflatten(2, (-1, layout.chunk))

    @staticmethod
    def chunk_slots(table: torch.Tensor, layout: SlotLayout, start: WindowStart | None = None) -> torch.Tensor:
        """Each chunk's slots from a projected slot table: (B, R, H, D) -> (B, H, P/C, W, D).

        Level 0 and the chunked levels are a chunk's own rows of their regions (no copy but the
        final one); the repeated levels' one block per chunk is gathered by `layout.repeated` (from
        pointer 0) or `start.repeated` (per batch row).
        """
        chunks = layout.rows // layout.chunk
        regions = table.split(layout.regions, dim=1)
        slots = [region.unflatten(1, (chunks, -1)) for region in regions[: 1 + layout.chunked]]  # (B, P/C, n, H, D)
        if start is not None and start.repeated is not None:
            slots.append(take_rows(regions[-1], start.repeated).unflatten(1, (chunks, -1)))
        elif layout.repeated is not None:
            slots.append(regions[-1].index_select(1, layout.repeated).unflatten(1, (chunks, -1)))
        return torch.cat([s.permute(0, 3, 1, 2, 4) for s in slots], dim=3)  # (B, H, P/C, W, D)

    @staticmethod
    def positions(chunked: torch.Tensor, layout: SlotLayout, start: WindowStart | None = None) -> torch.Tensor:
        """Back from rows by chunk to positions: (B, H, P/C, C, D) -> (B, T, H, D), padding rows dropped."""
        rows = chunked.flatten(2, 3)  # (B, H, P, D)
        if start is None:
            return rows[:, :, 1 : layout.length + 1].transpose(1, 2)
        return take_rows(rows.transpose(1, 2), start.tokens)  # (B, P, H, D) -> (B, T, H, D)

    def nodes_at(self, h: torch.Tensor, tree: list[torch.Tensor], position: torch.Tensor,
                 start: WindowStart | None = None) -> torch.Tensor:
        """The nodes a step at window position `position` leaves behind, read off a parallel pass: (B, S, E).

        h: (B, T, E); tree from `tree(h, ...)`; position: (B,) int64 < T, one per row. Level i is
        entry floor((p mod 2^i + position + 1) / 2^i) of the level's entries (p = 0 without `start`).
        """
        B, T, E = h.shape
        rows = position.view(B, 1, 1).expand(B, 1, E)
        nodes = [h.gather(1, rows)]  # (B, 1, E)
        for i, level in enumerate(tree, start=1):
            remainder = start.remainders[:, i - 1] if start is not None else torch.zeros_like(position)
            entry = block_entry(remainder, position + 1, 2**i, int(T) + 1)  # (B,)
            index = entry.view(B, 1, 1, 1).expand(B, 1, *level.shape[2:])
            nodes.append(level.gather(1, index).squeeze(1))  # (B, K, E)
        return torch.cat(nodes, dim=1)  # (B, S, E)

    def step_masks(self, pointer: torch.Tensor, dtype: torch.dtype, exact: bool = False, full: bool = False) -> StepMasks:
        """What a step at `pointer` (B,) needs, computed once for all layers (see `StepMasks`).

        `exact`: every row re-summarizes the same levels, so no per-row selection (no `changed`);
        `full`: every row has seen 2^(L-1)-1 tokens or more, so every slot is valid (no `bias`).
        """
        changed = None
        if not exact:
            changed = level_flags(pointer, self.node_block_sizes)  # (B, S); level 0 (size 1) always
            changed = changed.unsqueeze(-1).expand(-1, -1, self.n_embd).flatten(1)  # (B, S*E)
        if full:
            return StepMasks(changed, None)
        valid = self.valid(pointer)  # (B, A)
        ones = valid.to(dtype)  # 0/1; full-shape operands (Core ML mis-broadcasts scalar `where` operands)
        bias = torch.where(valid, ones * 0, ones - float("inf")).unsqueeze(1)  # (B, 1, A)
        return StepMasks(changed, bias)

    def update(self, h: torch.Tensor, nodes: torch.Tensor, levels: int, changed: torch.Tensor | None) -> torch.Tensor:
        """Sequential mode: the nodes after this token, flattened.

        h: (B, E) this token's input; nodes: (B, S*E) after the previous token (flattened (B, S, E)).
        Level i becomes summarize(old level i-1, new level i-1) exactly when 2^i | t+1; only levels
        1..`levels` are computed. With `changed` (B, S*E) from `step_masks`, rows that re-summarize
        fewer levels keep their old nodes (any pointers, levels = max_levels - 1); without it, every
        row must re-summarize exactly `levels` levels. Returns (B, S*E).
        """
        E, K = self.n_embd, self.n_bank
        computed, newer = [h], h  # new level 0, then each new level flattened over banks (B, K*E)
        if levels:
            weight, bias = self.summarize.pair_affine()  # (2*K*E, K*E), (K*E,): once for every level
        for i in range(1, levels + 1):
            if i == 1:  # [previous token, this token] (B, 2E)
                newer = torch.cat([nodes[:, :E], h], dim=1) @ self.summarize.token_pair_weight(weight) + bias
            else:
                older = nodes[:, (1 + (i - 2) * K) * E : (1 + (i - 1) * K) * E]  # (B, K*E)
                newer = torch.cat([older, newer], dim=1) @ weight + bias
            computed.append(newer)
        computed.append(nodes[:, (1 + levels * K) * E :])  # the levels that do not change
        computed = torch.cat(computed, dim=1)  # (B, S*E)
        return computed if changed is None else torch.where(changed, computed, nodes)

    def widen(self, summaries: torch.Tensor) -> torch.Tensor:
        """Summary nodes to attention slots: (..., K, E) -> (..., K*X, E) (identity without expander)."""
        if self.expander is None:
            return summaries
        return self.expander(summaries).flatten(-3, -2)

    def slots(self, nodes: torch.Tensor) -> torch.Tensor:
        """Attention slots of a node set: (..., S, E) -> (..., A, E); level 0 first."""
        if self.expander is None:
            return nodes
        summaries = nodes[..., 1:, :].unflatten(-2, (self.max_levels - 1, self.n_bank))  # (..., L-1, K, E)
        return torch.cat([nodes[..., :1, :], self.widen(summaries).flatten(-3, -2)], dim=-2)

    def valid(self, position: torch.Tensor) -> torch.Tensor:
        """Which attention slots hold a complete block at `position`: (...) int64 -> (..., A) bool."""
        return level_valid(position, self.slot_block_sizes)
