"""Summarizers (two level i-1 nodes -> one level i node) and the expander.

Shape letters: N any leading dims, K banks, E embedding width, X expander slots (1 + expand).
Every module maps per bank; a summarizer is shared across levels (paper section 3).

All three summarizers are affine in the pair, so each is applied through one (2*K*E, K*E) matrix
(`pair_affine`) on the flattened pair [older banks, newer banks]: a single matmul per summary in
both modes, which is what makes a step's summary one operator in an exported graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LMNConfig


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class PairSummarizer(nn.Module):
    """Base: summarize(older, newer) = [older, newer] (flattened over banks) @ W + b, W from `pair_affine`."""

    def __init__(self, n_bank: int, n_embd: int):
        super().__init__()
        self.n_bank, self.n_embd = n_bank, n_embd

    def pair_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """weight (2*K*E, K*E) and bias (K*E,) of the map [older (K*E), newer (K*E)] -> summary (K*E)."""
        raise NotImplementedError

    def token_pair_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """For level 1, whose two nodes are single tokens shared by every bank: the pair weight with
        the bank repeats folded in, (2*K*E, K*E) -> (2E, K*E), so [older, newer] (N, 2E) @ it + bias
        equals the summary of each token repeated over the banks."""
        K, E = self.n_bank, self.n_embd
        return weight.view(2, K, E, K * E).sum(1).flatten(0, 1)

    def pairs(self, pair: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The summary of flattened pairs: pair (N, 2*K*E) [older banks, newer banks] -> (N, K*E), with
        `affine` = `pair_affine()` (or its `token_pair_weight` and bias, for token pairs (N, 2E)).

        The parallel pass reads a level's consecutive nodes 2j, 2j+1 as one row of a view, so no
        pair is copied."""
        weight, bias = affine
        return pair @ weight + bias

    def forward(self, older: torch.Tensor, newer: torch.Tensor,
                affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """older, newer: (N, K, E) -> (N, K, E); `affine`: `pair_affine()`, when the caller reuses it."""
        pair = torch.cat([older.flatten(-2), newer.flatten(-2)], dim=-1)  # (N, 2*K*E)
        return self.pairs(pair, affine if affine is not None else self.pair_affine()).unflatten(-1, older.shape[-2:])


class LinearSummarizer(PairSummarizer):
    """One affine map of the concatenated pair, per bank: (2E -> E)."""

    def __init__(self, n_bank: int, n_embd: int):
        super().__init__(n_bank, n_embd)
        self.weight = _uniform((n_bank, 2 * n_embd, n_embd), 2 * n_embd)
        self.bias = _uniform((n_bank, n_embd), 2 * n_embd)

    def pair_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        older, newer = self.weight[:, : self.n_embd], self.weight[:, self.n_embd :]  # (K, E, E) each
        K, E = self.n_bank, self.n_embd
        return torch.cat([block_diagonal(older, K, E), block_diagonal(newer, K, E)]), self.bias.flatten()


class ConvSummarizer(PairSummarizer):
    """A kernel-2 stride-2 convolution over the pair whose channels are all banks, so banks mix.

    Equivalent to Conv1d(K*E, K*E, kernel_size=2, stride=2) applied to the two-node sequence.
    """

    def __init__(self, n_bank: int, n_embd: int):
        super().__init__(n_bank, n_embd)
        width = n_bank * n_embd
        self.weight = _uniform((2 * width, width), 2 * width)
        self.bias = _uniform((width,), 2 * width)

    def pair_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.bias


class DepthwiseSeparableSummarizer(PairSummarizer):
    """Per-channel kernel-2 stride-2 convolution over the pair, then a pointwise projection (per bank)."""

    def __init__(self, n_bank: int, n_embd: int):
        super().__init__(n_bank, n_embd)
        self.depthwise = _uniform((n_bank, 2, n_embd), 2)
        self.depthwise_bias = _uniform((n_bank, n_embd), 2)
        self.pointwise = _uniform((n_bank, n_embd, n_embd), n_embd)
        self.pointwise_bias = _uniform((n_bank, n_embd), n_embd)

    def pair_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        # pointwise(older * d0 + newer * d1 + db) = older @ (d0 * P) + newer @ (d1 * P) + (db @ P + pb)
        scaled = self.depthwise.unsqueeze(-1) * self.pointwise.unsqueeze(1)  # (K, 2, E, E)
        K, E = self.n_bank, self.n_embd
        weight = torch.cat([block_diagonal(scaled[:, 0], K, E), block_diagonal(scaled[:, 1], K, E)])
        bias = (self.depthwise_bias.unsqueeze(1) @ self.pointwise).squeeze(1) + self.pointwise_bias  # (K, E)
        return weight, bias.flatten()


class Expander(nn.Module):
    """ConvTranspose1d(E, E, kernel 1+expand) over a one-node slot axis, per bank.

    Widens each summary node into X = 1 + expand attention slots (the paper's Expander Summarizer).
    """

    def __init__(self, n_bank: int, n_embd: int, expand: int):
        super().__init__()
        self.slots = 1 + expand
        # Same layout as ConvTranspose1d.weight (in, out, kernel), one per bank.
        self.weight = _uniform((n_bank, n_embd, n_embd, self.slots), n_embd * self.slots)
        self.bias = _uniform((n_bank, n_embd), n_embd * self.slots)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        """nodes: (N, K, E) -> (N, K, X, E)."""
        weight = self.weight.transpose(-1, -2).flatten(-2)  # (K, E, X*E)
        out = per_bank_matmul(nodes, weight)  # (N, K, X*E)
        return out.unflatten(-1, (self.slots, -1)) + self.bias.unsqueeze(-2)  # (N, K, X, E)


def block_diagonal(weight: torch.Tensor, n_bank: int, n_embd: int) -> torch.Tensor:
    """(K, E, E) per-bank weights -> (K*E, K*E) block-diagonal matrix (bank k maps inputs k*E.. to outputs k*E..).

    Shapes come from the config, not from `weight.shape`, so Core ML's tracer sees constants.
    """
    K, E = n_bank, n_embd
    eye = torch.eye(K, dtype=weight.dtype, device=weight.device)  # (K, K)
    return (eye.view(K, 1, K, 1) * weight.unsqueeze(2)).reshape(K * E, K * E)


def per_bank_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: (N, K, I) @ weight (K, I, O) -> (N, K, O), as one K-batched matmul (not N*K tiny ones)."""
    lead = x.shape[:-2]
    by_bank = x.reshape(-1, *x.shape[-2:]).transpose(0, 1)  # (K, N, I)
    return (by_bank @ weight).transpose(0, 1).reshape(*lead, weight.shape[0], weight.shape[-1])


def make_summarizer(cfg: LMNConfig) -> nn.Module:
    kinds = {
        "linear": LinearSummarizer,
        "conv": ConvSummarizer,
        "dwsep": DepthwiseSeparableSummarizer,
    }
    return kinds[cfg.summarizer](cfg.n_bank, cfg.n_embd)
