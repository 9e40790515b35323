"""The logarithmic memory: one tree of summaries per bank, built in parallel or one step at a time.

Shape letters: B batch, T time, L levels (max_levels), K banks, E width, S nodes (1 + (L-1)*K),
X expander slots per summary node (1 + expand), A attention slots (1 + (L-1)*K*X).

At position t, level i holds the summary of tokens [(k-1)*2^i, k*2^i - 1], k = floor((t+1)/2^i),
and is empty (zeros, masked) while k = 0. Level 0 is the token's own (normalized) input.
Both modes call the same `summarizer` on the same operands, so they agree to float rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
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


class LogMemory(nn.Module):
    """Builds memory nodes and turns them into attention slots with a validity mask."""

    def __init__(self, cfg: LMNConfig):
        super().__init__()
        self.n_bank = cfg.n_bank
        self.n_embd = cfg.n_embd
        self.max_levels = cfg.max_levels
        self.summarize = make_summarizer(cfg)
        self.expander = Expander(cfg.n_bank, cfg.n_embd, cfg.expand) if cfg.expand else None
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
        [j*2^i, (j+1)*2^i - 1] and is summarize(its older half, its newer half).
        """
        B, T, E = h.shape
        level = h.unsqueeze(2).expand(B, T, self.n_bank, E)  # (B, T, K, E) level 0 in every bank
        levels = []
        affine = self.summarize.pair_affine() if self.max_levels > 1 else None  # once for every level
        for _ in range(1, self.max_levels):
            n = level.shape[1] // 2
            pairs = level[:, : 2 * n].unflatten(1, (n, 2))  # (B, n, 2, K, E)
            level = self.summarize(pairs[:, :, 0], pairs[:, :, 1], affine)  # (B, n, K, E)
            levels.append(level)
        return levels

    @staticmethod
    def group(x: torch.Tensor, span: int) -> torch.Tensor:
        """Positions grouped by the level block they see: (B, T, ...) -> (B, G, span, ...).

        Group g holds positions t with floor((t+1)/span) = g, which see block g-1 (group 0: none);
        G = floor(T/span) + 1. Padding rows are zeros and are dropped by `ungroup`.
        """
        B, T = x.shape[:2]
        groups = T // span + 1
        pad_front = x.new_zeros(B, 1, *x.shape[2:])
        pad_back = x.new_zeros(B, groups * span - T - 1, *x.shape[2:])
        return torch.cat([pad_front, x, pad_back], dim=1).unflatten(1, (groups, span))

    @staticmethod
    def ungroup(x: torch.Tensor, length: int) -> torch.Tensor:
        """Inverse of `group`: (B, G, span, ...) -> (B, T, ...)."""
        return x.flatten(1, 2)[:, 1 : length + 1]

    @staticmethod
    def blocks_by_group(blocks: torch.Tensor) -> torch.Tensor:
        """(B, n, ...) blocks -> (B, n+1, ...) the block each `group` sees, zeros for group 0."""
        return torch.cat([blocks.new_zeros(blocks.shape[0], 1, *blocks.shape[2:]), blocks], dim=1)

    def nodes_at(self, h: torch.Tensor, tree: list[torch.Tensor], position: torch.Tensor) -> torch.Tensor:
        """The nodes a step at `position` leaves behind, read off a parallel pass: (B, S, E).

        h: (B, T, E); tree from `tree(h)`; position: (B,) int64 < T, one per row. Level i is the
        block of group floor((position+1)/2^i) (zeros for group 0), as in `group`.
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
