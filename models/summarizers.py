"""Summarizers (two level i-1 nodes -> one level i node) and the expander.

Shape letters: N any leading dims, K banks, E embedding width, X expander slots (1 + expand).
Every module maps per bank; a summarizer is shared across levels (paper section 3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LMNConfig


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class LinearSummarizer(nn.Module):
    """One affine map of the concatenated pair, per bank: (2E -> E)."""

    def __init__(self, n_bank: int, n_embd: int):
        super().__init__()
        self.weight = _uniform((n_bank, 2 * n_embd, n_embd), 2 * n_embd)
        self.bias = _uniform((n_bank, n_embd), 2 * n_embd)

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        """older, newer: (N, K, E) -> (N, K, E)."""
        pair = torch.cat([older, newer], dim=-1)  # (N, K, 2E)
        return per_bank_matmul(pair, self.weight) + self.bias  # (N, K, E)


class ConvSummarizer(nn.Module):
    """A kernel-2 stride-2 convolution over the pair whose channels are all banks, so banks mix.

    Equivalent to Conv1d(K*E, K*E, kernel_size=2, stride=2) applied to the two-node sequence.
    """

    def __init__(self, n_bank: int, n_embd: int):
        super().__init__()
        width = n_bank * n_embd
        self.n_bank = n_bank
        self.weight = _uniform((2 * width, width), 2 * width)
        self.bias = _uniform((width,), 2 * width)

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        """older, newer: (N, K, E) -> (N, K, E)."""
        pair = torch.cat([older.flatten(-2), newer.flatten(-2)], dim=-1)  # (N, 2*K*E)
        out = pair @ self.weight + self.bias  # (N, K*E)
        return out.unflatten(-1, (self.n_bank, -1))  # (N, K, E)


class DepthwiseSeparableSummarizer(nn.Module):
    """Per-channel kernel-2 stride-2 convolution over the pair, then a pointwise projection."""

    def __init__(self, n_bank: int, n_embd: int):
        super().__init__()
        self.depthwise = _uniform((n_bank, 2, n_embd), 2)
        self.depthwise_bias = _uniform((n_bank, n_embd), 2)
        self.pointwise = _uniform((n_bank, n_embd, n_embd), n_embd)
        self.pointwise_bias = _uniform((n_bank, n_embd), n_embd)

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        """older, newer: (N, K, E) -> (N, K, E)."""
        mixed = older * self.depthwise[:, 0] + newer * self.depthwise[:, 1] + self.depthwise_bias
        return per_bank_matmul(mixed, self.pointwise) + self.pointwise_bias


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
