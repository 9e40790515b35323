"""GPT-2-style baseline with a KV-cache `step`, for the paper's Table 1 and the benchmark.

Shape letters: B batch, T time, C cache rows (block_size), N layers, H heads, D head width, E width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # per-head q, k, v, no bias
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (..., E) -> q, k, v each (..., H, D)."""
        return tuple(t.unflatten(-1, (self.n_head, -1)) for t in self.qkv(x).chunk(3, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, E) -> (B, T, E)."""
        q, k, v = (t.transpose(1, 2) for t in self.split(x))  # (B, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).flatten(-2))

    def attend(self, q: torch.Tensor, scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Softmax-weighted values: scores (B, H, 1, C) already masked, values (B, H, C, D) -> (B, E)."""
        return self.out_proj((torch.softmax(scores, dim=-1) @ values).squeeze(2).flatten(-2))

    def scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q (B, H, D) against keys (B, H, C, D) -> (B, H, 1, C)."""
        return (q.unsqueeze(2) @ keys.transpose(-1, -2)) / math.sqrt(q.shape[-1])

    def step(self, x, keys, values, pointer):
        """Full-cache layout. x: (B, E); keys/values: (B, H, C, D) -> (B, E), caches with row `pointer` set."""
        q, k, v = self.split(x)  # (B, H, D)
        rows = torch.arange(keys.shape[2], device=x.device)  # (C,)
        here = (rows == pointer.unsqueeze(-1)).unsqueeze(1).unsqueeze(-1)  # (B, 1, C, 1)
        keys = torch.where(here, k.unsqueeze(2), keys)
        values = torch.where(here, v.unsqueeze(2), values)
        seen = (rows <= pointer.unsqueeze(-1)).unsqueeze(1).unsqueeze(1)  # (B, 1, 1, C)
        scores = torch.where(seen, self.scores(q, keys), float("-inf"))
        return self.attend(q, scores, values), keys, values

    def step_rows(self, x, keys, values, pointer):
        """Read-only cache layout: the caller writes the returned rows into its cache in place.

        x: (B, E); keys/values: (B, H, C, D), rows < pointer valid -> (B, E), k and v rows (B, H, D).
        """
        q, k, v = self.split(x)
        rows = torch.arange(keys.shape[2], device=x.device)
        seen = (rows < pointer.unsqueeze(-1)).unsqueeze(1).unsqueeze(1)  # (B, 1, 1, C)
        cached = torch.where(seen, self.scores(q, keys), float("-inf"))  # (B, H, 1, C)
        own = self.scores(q, k.unsqueeze(2))  # (B, H, 1, 1)
        weights = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1)  # no copy of the cache itself
        mixed = weights[..., :-1] @ values + weights[..., -1:] * v.unsqueeze(2)  # (B, H, 1, D)
        return self.out_proj(mixed.squeeze(2).flatten(-2)), k, v

    def step_concat(self, x, past_keys, past_values):
        """Concat layout (what common exporters produce): past (B, H, T, D) -> present (B, H, T+1, D)."""
        q, k, v = self.split(x)
        keys = torch.cat([past_keys, k.unsqueeze(2)], dim=2)
        values = torch.cat([past_values, v.unsqueeze(2)], dim=2)
        return self.attend(q, self.scores(q, keys), values), keys, values


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ff = nn.LayerNorm(cfg.n_embd)
        self.ff = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.ReLU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.ff(self.ln_ff(x))

    def step(self, x, keys, values, pointer, layout: str = "full"):
        """One token through the block; `layout` picks the attention's cache formulation."""
        h = self.ln_attn(x)
        if layout == "full":
            out, keys, values = self.attn.step(h, keys, values, pointer)
        elif layout == "rows":
            out, keys, values = self.attn.step_rows(h, keys, values, pointer)
        else:
            out, keys, values = self.attn.step_concat(h, keys, values)
        x = x + out
        return x + self.ff(self.ln_ff(x)), keys, values


@dataclass
class KVState:
    """keys, values: (B, N, H, C, D); pointer: (B,) int64 position of the next token (< C)."""

    keys: torch.Tensor
    values: torch.Tensor
    pointer: torch.Tensor


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.positions = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) with T <= block_size -> logits (B, T, V)."""
        T = tokens.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the GPT block size {self.config.block_size}")
        x = self.embed(tokens) + self.positions(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_out(x))

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> KVState:
        cfg = self.config
        shape = (batch_size, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.head_dim)
        zeros = torch.zeros(shape, dtype=self.head.weight.dtype, device=device)
        return KVState(zeros, zeros.clone(), torch.zeros(batch_size, dtype=torch.int64, device=device))

    def step(self, tokens: torch.Tensor, state: KVState) -> tuple[torch.Tensor, KVState]:
        """tokens: (B,) -> logits (B, V). The cache holds block_size tokens; a full cache is an error."""
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            if bool((state.pointer >= self.config.block_size).any()):
                raise ValueError(f"KV cache is full ({self.config.block_size} tokens); start a new stream")
        logits, keys, values = self.step_layout(tokens, state.keys, state.values, state.pointer, "full")
        return logits, KVState(keys, values, state.pointer + 1)

    def step_layout(self, tokens, keys, values, pointer, layout: str):
        """The step under a cache layout (see CausalSelfAttention): "full" returns whole caches with
        row `pointer` set, "rows" returns only the new rows (B, N, H, D) for an in-place update,
        "concat" takes past caches (B, N, H, T, D) with T = pointer and returns them one row longer."""
        x = self.embed(tokens) + self.positions(pointer)
        new_keys, new_values = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v = block.step(x, keys[:, layer], values[:, layer], pointer, layout)
            new_keys.append(k)
            new_values.append(v)
        return self.head(self.norm_out(x)), torch.stack(new_keys, 1), torch.stack(new_values, 1)
