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


@functools.lru_cache(maxsize=32)
def _slot_layout(length: int, chunk: int, slots_per_block: int, max_levels: int, device: torch.device,
                 anchor: torch.Tensor | None = None) -> SlotLayout:
    """`SlotLayout` for T = length, C = chunk, KX = slots_per_block (banks * expander slots).

    Built from Python integers and aranges only: divisions are of numbers below P (< 2^24)."""
    T, C, KX = length, chunk, slots_per_block
    levels = min(max_levels - 1, T.bit_length() - 1)  # 2^i <= T
    chunked = min(C.bit_length() - 1, levels)
    P = -(-(T + 1) // C) * C
    repeated_levels = range(chunked + 1, levels + 1)
    regions = (P, *(P // 2**i * KX for i in range(1, chunked + 1)), sum((T // 2**i + 1) * KX for i in repeated_levels))
    # Per slot of a chunk: its level's block size, its block among the chunk's, and the first entry holding a block.
    span, local, first = [1] * C, list(range(C)), [0] * C  # level 0: the chunk's own rows, always valid
    for i in range(1, levels + 1):
        blocks = C // 2**i if i <= chunked else 1
        span += [2**i] * (blocks * KX)
        local += [u for u in range(blocks) for _ in range(KX)]
        first += [1] * (blocks * KX)
    span, local, first = (torch.tensor(v, dtype=torch.int64, device=device) for v in (span, local, first))  # (W,)
    start = torch.arange(P // C, device=device).view(-1, 1, 1) * C  # (P/C, 1, 1): each chunk's first row
    if anchor is not None:
        start = start + anchor  # a zero the exporter cannot fold: the mask is computed in the graph
    row = start + torch.arange(C, device=device).view(1, -1, 1)  # (P/C, C, 1)
    entry = torch.div(start, span, rounding_mode="floor") + local  # (P/C, 1, W): the entry a slot holds
    valid = (torch.div(row, span, rounding_mode="floor") == entry) & (entry >= first)  # (P/C, C, W)
    repeated, offset = [], 0
    for i in repeated_levels:
        entry = torch.div(start.view(-1, 1), 2**i, rounding_mode="floor")  # (P/C, 1)
        repeated.append(offset + entry * KX + torch.arange(KX, device=device))  # (P/C, KX)
        offset += (T // 2**i + 1) * KX
    repeated = torch.cat(repeated, dim=1).flatten() if repeated else None
    return SlotLayout(T, P, C, levels, chunked, regions, repeated, valid)


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

    def tree(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Parallel mode: every complete aligned block's summary, per level i = 1..L-1.

        h: (B, T, E) -> [(B, floor(T / 2^i), K, E) for each i]; block j covers tokens
        [j*2^i, (j+1)*2^i - 1] and is summarize(its older half, its newer half). A level's nodes
        2j, 2j+1 are one row of a view (no pair is copied); level 1's tokens are shared by every
        bank, so it uses the token-pair weight, as the step does.
        """
        B, _, E = h.shape
        if self.max_levels == 1:
            return []
        weight, bias = self.summarize.pair_affine()  # once for every level
        level, affine = h, (self.summarize.token_pair_weight(weight), bias)  # level 0 (B, T, E): one node per token
        levels = []
        for _ in range(1, self.max_levels):
            n = level.shape[1] // 2
            pair = level[:, : 2 * n].reshape(B, n, 2 * level.shape[-1])  # nodes 2j, 2j+1 side by side: (B, n, 2E or 2*K*E)
            level = self.summarize.pairs(pair, affine)  # (B, n, K*E)
            levels.append(level.unflatten(-1, (self.n_bank, E)))  # (B, n, K, E)
            affine = (weight, bias)
        return levels

    def slot_layout(self, length: int, device: torch.device, anchor: torch.Tensor | None = None) -> SlotLayout:
        """The parallel pass's slot layout for sequences of `length` tokens (see `SlotLayout`);
        built once per (length, device) and kept, except while tracing (then built in the graph).

        anchor: while tracing, a () int64 zero computed from a graph input: adding it keeps the
        exporter from folding the (P/C, C, W) mask into a float constant per layer (4 MB at T=4096).
        """
        args = (length, self.chunk, self.n_bank * self.slots_per_node, self.max_levels, device)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return _slot_layout.__wrapped__(*args, anchor=anchor)
        return _slot_layout(*args)

    def slot_table(self, h: torch.Tensor, tree: list[torch.Tensor], layout: SlotLayout) -> torch.Tensor:
        """Every attention slot of a parallel pass, once, as rows ready for one projection (see `SlotLayout`).

        h: (B, T, E), tree from `tree(h)` -> (B, sum(layout.regions), E). Padding rows are zeros;
        every slot they stand in for is masked or dropped.
        """
        B, T, E = h.shape
        KX, P = self.n_bank * self.slots_per_node, layout.rows
        counts = [level.shape[1] for level in tree[: layout.levels]]  # n_i
        entries = [P // 2**i if i <= layout.chunked else n + 1 for i, n in enumerate(counts, start=1)]
        pads = [(e - 1 - n) * KX for e, n in zip(entries, counts)]  # zero rows after each level's blocks
        zeros = h.new_zeros(B, max([P - T - 1, KX, *pads]), E)
        pieces = [zeros[:, :1], h, zeros[:, : P - T - 1]]  # level 0: row r = the token at position r-1
        levels = tree[: layout.levels]  # [(B, n_i, K, E)]
        if levels and self.expander is not None:  # every level widened at once: (B, sum n_i, KX, E), split back
            levels = self.widen(torch.cat(levels, dim=1)).split(counts, dim=1)
        for nodes, pad in zip(levels, pads):
            pieces += [zeros[:, :KX], nodes.flatten(1, 2), zeros[:, :pad]]  # entry 0 (no block), blocks, padding
        return torch.cat(pieces, dim=1)

    @staticmethod
    def chunk_rows(x: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
        """Per-position vectors as rows by chunk: (B, T, H, D) -> (B, H, P/C, C, D), row r = position
        r - 1 (padding rows zeros), in one copy."""
        rows = F.pad(x.movedim(2, 1), (0, 0, 1, layout.rows - layout.length - 1))  # (B, H, P, D)
        return rows.unflatten(2, (-1, layout.chunk))

    @staticmethod
    def chunk_slots(table: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
        """Each chunk's slots from a projected slot table: (B, R, H, D) -> (B, H, P/C, W, D).

        Level 0 and the chunked levels are a chunk's own rows of their regions (no copy but the
        final one); the repeated levels' one block per chunk is gathered by `layout.repeated`.
        """
        chunks = layout.rows // layout.chunk
        regions = table.split(layout.regions, dim=1)
        slots = [region.unflatten(1, (chunks, -1)) for region in regions[: 1 + layout.chunked]]  # (B, P/C, n, H, D)
        if layout.repeated is not None:
            slots.append(regions[-1].index_select(1, layout.repeated).unflatten(1, (chunks, -1)))
        return torch.cat([s.movedim(3, 1) for s in slots], dim=3)  # (B, H, P/C, W, D)

    @staticmethod
    def positions(chunked: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
        """Back from rows by chunk to positions: (B, H, P/C, C, D) -> (B, T, H, D), padding rows dropped."""
        return chunked.flatten(2, 3)[:, :, 1 : layout.length + 1].movedim(1, -2)

    @staticmethod
    def blocks_by_group(blocks: torch.Tensor) -> torch.Tensor:
        """(B, n, ...) blocks -> (B, n+1, ...): entry g is block g-1, the one a position t with
        floor((t+1)/2^i) = g sees (zeros for g = 0)."""
        return torch.cat([blocks.new_zeros(blocks.shape[0], 1, *blocks.shape[2:]), blocks], dim=1)

    def nodes_at(self, h: torch.Tensor, tree: list[torch.Tensor], position: torch.Tensor) -> torch.Tensor:
        """The nodes a step at `position` leaves behind, read off a parallel pass: (B, S, E).

        h: (B, T, E); tree from `tree(h)`; position: (B,) int64 < T, one per row. Level i is
        entry floor((position+1)/2^i) of `blocks_by_group` (zeros for entry 0).
        """
        B, _, E = h.shape
        rows = position.view(B, 1, 1).expand(B, 1, E)
        nodes = [h.gather(1, rows)]  # (B, 1, E)
        for i, level in enumerate(tree, start=1):
            group = torch.div(position + 1, 2**i, rounding_mode="floor")  # exact: T < 2^24
            index = group.view(B, 1, 1, 1).expand(B, 1, *level.shape[2:])
            nodes.append(self.blocks_by_group(level).gather(1, index).squeeze(1))  # (B, K, E)
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
