"""The LMN language model: `forward` (parallel mode) and `step` (sequential mode) share every layer.

Shape letters: B batch, T time, V vocab, E width (n_embd), H heads, D head width, S memory nodes
per layer (config.n_slots), A attention slots per layer (config.n_attn_slots), N layers; the parallel
pass's slot table has R rows, and P, C, W are its rows, chunk and slots per chunk (models/memory.py).

Reference: "Logarithmic Memory Networks (LMNs): Efficient Long-Range Sequence Modeling for
Resource-Constrained Environments". Deliberate differences from the paper's code: the step
can compute only the levels that change (fast-path graphs), its attention reads the raw
memory nodes through reassociated projections (`SingleVectorAttention.read`) instead of projecting
every slot every token, and the validity mask is explicit rather than inferred from zero scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMNConfig
from .memory import LogMemory, StepMasks, WindowStart, levels_changed


class RMSNorm(nn.Module):
    def __init__(self, n_embd: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written as a division by sqrt so onnxruntime fuses it into one SimplifiedLayerNormalization.
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# A step folds its per-head query/key and value/output factors into single matrices when those
# hold at most this many floats per layer (8 * n_embd^2 for 4 heads: n_embd 32 yes, 128 no).
FOLD_MAX_WEIGHTS = 16384


class SingleVectorAttention(nn.Module):
    """Multi-head attention of one query vector over a set of memory slots.

    The math is split into `query`/`key_value` projections, `score`, `normalize` and `weigh`, so the
    parallel pass can score a chunk of positions against the slots they share in one product
    (no per-position copy of the keys); the step reads its slot set through `read`, the same math
    reassociated.
    """

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.scale = 1.0 / math.sqrt(n_embd // n_head)
        self.q_proj = nn.Linear(n_embd, n_embd)
        self.k_proj = nn.Linear(n_embd, n_embd)
        self.v_proj = nn.Linear(n_embd, n_embd)
        self.out_proj = nn.Linear(n_embd, n_embd)

    def query(self, h: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (..., H, D), pre-scaled by 1/sqrt(D)."""
        return self.q_proj(h).unflatten(-1, (self.n_head, -1)) * self.scale

    def key_value(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., E) -> keys, values (..., H, D)."""
        return tuple(p(slots).unflatten(-1, (self.n_head, -1)) for p in (self.k_proj, self.v_proj))

    @staticmethod
    def score(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Queries q (..., P, D) against keys k (..., A, D) -> scores (..., P, A) (heads in `...`)."""
        return q @ k.transpose(-1, -2)

    @staticmethod
    def normalize(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Softmax over the valid slots only: scores (..., P, A), valid broadcastable to it -> weights (..., P, A).

        Level 0 is always valid, so no row is empty.
        """
        return torch.softmax(torch.where(valid, scores, float("-inf")), dim=-1)

    @staticmethod
    def weigh(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """weights (..., P, A) and values (..., A, D) -> (..., P, D)."""
        return weights @ v

    def output(self, mixed: torch.Tensor) -> torch.Tensor:
        """(..., H, D) -> (..., E)."""
        return self.out_proj(mixed.flatten(-2))

    def read(self, h: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One token attending to raw slots: h (B, E), slots (B, A, E), bias (B, 1, A) of 0/-inf
        (None: every slot valid) -> (B, E).

        Same math as query/key_value/score/weigh/output, reassociated so no slot is projected:
        score_h(s) = (W_k,h^T q_h) . s + (a term constant over slots, which the softmax ignores),
        and weights_h @ v_h = W_v,h (weights_h @ S) + b_v,h because each head's weights sum to 1.
        Small models multiply the per-head factors into one matrix each (fewer operators); large
        ones keep them apart (half the weight bytes read per token), each weight read whole by one
        2-D product (the form weight-only quantizers take) that also makes the other heads' unused
        cross terms, dropped by a 0/1 head mask.
        """
        H, E = self.n_head, self.q_proj.in_features
        fold = H * E * E <= FOLD_MAX_WEIGHTS
        if fold:
            w_q, w_k, w_v = (p.weight.view(H, -1, E) for p in (self.q_proj, self.k_proj, self.v_proj))  # (H, D, E)
            w_qk = (w_q.transpose(1, 2) @ w_k * self.scale).transpose(0, 1).flatten(1)  # (E, H*E)
            b_qk = (self.q_proj.bias.view(H, 1, -1) @ w_k).flatten() * self.scale  # (H*E,)
            qk = (h @ w_qk + b_qk).unflatten(-1, (H, E))  # (B, H, E)
        else:
            own = torch.eye(H, dtype=torch.bool, device=h.device).unsqueeze(-1)  # (H, H, 1): head i's own block j = i
            q_rows = torch.where(own, self.query(h).unsqueeze(-3), 0.0).flatten(-2)  # (B, 1, H, D) -> (B, H, H*D): row i holds q_i in head i's columns
            qk = q_rows @ self.k_proj.weight  # (B, H, H*D) @ (H*D, E) -> (B, H, E): row i is W_k,i^T q_i
        scores = qk @ slots.transpose(-1, -2)  # (B, H, A)
        weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
        mixed = weights @ slots  # (B, H, E)
        if fold:
            w_o = self.out_proj.weight.view(E, H, -1).permute(1, 2, 0)  # (H, D, E)
            b_out = self.out_proj(self.v_proj.bias)  # (E,): the value bias, projected
            return mixed.flatten(-2) @ (w_v.transpose(1, 2) @ w_o).flatten(0, 1) + b_out  # (B, H*E) @ (H*E, E)
        every = self.v_proj(mixed.flatten(0, 1)).view(-1, H, H, E // H)  # (B*H, E) -> (B, H, H, D): every head's values of each row
        return self.output(torch.where(own, every, 0.0).sum(-2))  # (B, H, D): head i's own values of row i -> (B, E)


class FeedForward(nn.Module):
    def __init__(self, n_embd: int, ff_mult: int):
        super().__init__()
        self.up = nn.Linear(n_embd, ff_mult * n_embd)
        self.down = nn.Linear(ff_mult * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


class LMNBlock(nn.Module):
    """Pre-norm -> logarithmic memory -> single-vector attention -> residual; pre-norm FF -> residual."""

    def __init__(self, cfg: LMNConfig):
        super().__init__()
        self.n_slots, self.n_embd = cfg.n_slots, cfg.n_embd
        self.norm_attn = RMSNorm(cfg.n_embd)
        self.memory = LogMemory(cfg)
        self.attn = SingleVectorAttention(cfg.n_embd, cfg.n_head)
        self.norm_ff = RMSNorm(cfg.n_embd)
        self.ff = FeedForward(cfg.n_embd, cfg.ff_mult)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None, nodes: torch.Tensor | None = None,
                start: WindowStart | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, E), last: (B,) -> (B, T, E) and the nodes left after window position `last` (B, S, E)
        (None without `last`). From a state: its nodes (B, S, E) of this layer and `start` (its pointer's
        alignment, shared by every layer); None: the empty state at pointer 0.

        Every slot (each token, each level's widened summaries) is projected once, in one table;
        positions go by chunks of C rows, which share their slots, so one product per chunk and
        head scores all levels and one softmax spans them (see `SlotLayout`).
        """
        attn, memory = self.attn, self.memory
        anchor = None if last is None else (last[:1] * 0).sum()  # () int64 zero from a graph input (see slot_layout)
        layout = memory.slot_layout(x.shape[1], x.device, anchor, from_state=start is not None)
        h = self.norm_attn(x)
        tree = memory.tree(h, nodes, start)  # [(B, 1+n_i, K, E)]
        table = memory.slot_table(h, tree, layout, start)  # (B, R, E)
        q = memory.chunk_rows(attn.query(h), layout, start)  # (B, T, H, D) -> (B, H, P/C, C, D)
        k, v = (memory.chunk_slots(t, layout, start) for t in attn.key_value(table))  # (B, R, H, D) -> (B, H, P/C, W, D)
        scores = attn.score(q, k)  # (B, H, P/C, C, W)
        if start is not None:  # which slots hold a block differs per batch row
            bias = memory.chunk_slots(start.table_bias.to(scores.dtype)[..., None, None], layout, start)  # (B, 1, P/C, W, 1)
            scores = scores + bias.transpose(-1, -2)
        weights = attn.normalize(scores, layout.valid)  # (B, H, P/C, C, W)
        x = x + attn.output(memory.positions(attn.weigh(weights, v), layout, start))  # (B, T, H, D) -> (B, T, E)
        nodes = None if last is None else memory.nodes_at(h, tree, last, start)
        return x + self.ff(self.norm_ff(x)), nodes

    def step(self, x: torch.Tensor, nodes: torch.Tensor, masks: StepMasks, levels: int):
        """x: (B, E), nodes: (B, S*E) flattened, masks from `LogMemory.step_masks`, `levels` as in
        `LogMemory.update` -> x (B, E), nodes (B, S*E)."""
        h = self.norm_attn(x)
        nodes = self.memory.update(h, nodes, levels, masks.changed)
        slots = self.memory.slots(nodes.unflatten(1, (self.n_slots, self.n_embd)))  # (B, A, E)
        x = x + self.attn.read(h, slots, masks.bias)
        return x + self.ff(self.norm_ff(x)), nodes


POINTER_LIMIT = 2**63 - 1  # an int64 pointer: a stream's last token is at most POINTER_LIMIT - 1


def check_start(cfg: LMNConfig, state: "StepState", tokens: torch.Tensor, dtype: torch.dtype) -> None:
    """A starting state fits the model and the tokens: a ValueError that says what is wrong."""
    B, T = tokens.shape
    shape = (B, cfg.n_layer, cfg.n_slots, cfg.n_embd)
    memory, pointer = state.memory, state.pointer
    if not isinstance(memory, torch.Tensor) or tuple(memory.shape) != shape or memory.dtype != dtype:
        got = (tuple(memory.shape), memory.dtype) if isinstance(memory, torch.Tensor) else type(memory).__name__
        raise ValueError(f"the starting state's memory must be {dtype} of shape {shape} (batch, n_layer, n_slots, "
                         f"n_embd), got {got}")
    if not isinstance(pointer, torch.Tensor) or tuple(pointer.shape) != (B,) or pointer.dtype != torch.int64:
        got = (tuple(pointer.shape), pointer.dtype) if isinstance(pointer, torch.Tensor) else type(pointer).__name__
        raise ValueError(f"the starting state's pointer must be int64 of shape ({B},), one per row, got {got}")
    if bool((pointer < 0).any()) or bool((pointer > POINTER_LIMIT - T).any()):
        raise ValueError(f"the starting pointers must be in [0, {POINTER_LIMIT - T}] so that {T} more tokens fit "
                         f"an int64 position, got {pointer.tolist()}")


@dataclass
class StepState:
    """The whole recurrent state of a batch of streams; its size never depends on their length.

    memory:  (B, n_layer, n_slots, n_embd) float. Per layer, slot 0 is the last token's level-0
             node and slot 1 + (i-1)*n_bank + b is bank b's level-i summary (zeros while empty).
    pointer: (B,) int64, the position of the next token of each row (rows may differ).
    """

    memory: torch.Tensor
    pointer: torch.Tensor


class LMN(nn.Module):
    def __init__(self, cfg: LMNConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(LMNBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, tokens: torch.Tensor, return_state: bool = False, lengths: torch.Tensor | None = None,
                state: StepState | None = None):
        """Parallel mode. tokens: (B, T) int64 -> logits (B, T, V) [, StepState].

        `state`: where each row starts (memory and per-row pointer, as `step` takes it; None: the
        empty state at pointer 0); gradients flow into it (detach it to stop them). With
        `return_state`, also the state a stream has after its first `lengths` tokens (B,) (default:
        all T), exactly what stepping them from `state` would leave; later tokens do not affect it.
        """
        B, T = tokens.shape
        if state is not None and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_start(self.config, state, tokens, self.head.weight.dtype)
        if return_state and lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=tokens.device)
        last = lengths - 1 if return_state else None  # no state asked for: no nodes read off
        start = None if state is None else self.blocks[0].memory.window_start(state.pointer, T)
        x = self.embed(tokens)  # (B, T, E)
        memory = []
        for layer, block in enumerate(self.blocks):
            x, nodes = block(x, last, None if state is None else state.memory[:, layer], start)
            memory.append(nodes)  # (B, S, E)
        logits = self.head(self.norm_out(x))
        if not return_state:
            return logits
        pointer = lengths if state is None else state.pointer + lengths
        return logits, StepState(torch.stack(memory, dim=1), pointer)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> StepState:
        """The empty state: zero memory, every pointer at 0. See StepState for the layout."""
        cfg = self.config
        dtype = self.head.weight.dtype
        memory = torch.zeros(batch_size, cfg.n_layer, cfg.n_slots, cfg.n_embd, dtype=dtype, device=device)
        return StepState(memory, torch.zeros(batch_size, dtype=torch.int64, device=device))

    def step(self, tokens: torch.Tensor, state: StepState, levels: int | None = None,
             full: bool = False) -> tuple[torch.Tensor, StepState]:
        """Sequential mode. tokens: (B,) int64 -> logits (B, V) and the state after them.

        `levels` = k promises that every row re-summarizes exactly k levels this step (k = the
        trailing zero bits of pointer+1, capped at max_levels-1), so only those k summaries are
        computed: a graph traced with it is a fast path valid at those pointers only. None: valid
        at any pointers (traced: every level computed and selected per row). `full` promises that
        every row's memory is full (pointer+1 >= 2^(max_levels-1)), so no slot needs masking.
        """
        cfg, memory = self.config, self.blocks[0].memory
        most = cfg.max_levels - 1
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if levels is not None and not 0 <= levels <= most:
            raise ValueError(f"levels must be in 0..{most} (max_levels - 1), got {levels}")
        if not tracing:
            counts = levels_changed(state.pointer, memory.block_sizes).unique().tolist()
            if levels is not None and counts != [levels]:
                raise ValueError(f"levels={levels}, but at these pointers rows re-summarize {counts} levels")
            if full and bool((state.pointer + 1 < 2**most).any()):
                raise ValueError(f"full=True, but a row has seen fewer than {2**most - 1} tokens")
            levels = counts[0] if len(counts) == 1 else None
        if most == 0:  # no summary levels: every row re-summarizes exactly 0, its one slot is always valid
            levels, full = 0, True
        exact = levels is not None
        levels = most if levels is None else levels
        x = self.embed(tokens)  # (B, E)
        masks = memory.step_masks(state.pointer, x.dtype, exact, full)  # the same for every layer
        old = state.memory.flatten(2)  # (B, N, S*E)
        new_memory = []
        for layer, block in enumerate(self.blocks):
            x, nodes = block.step(x, old[:, layer], masks, levels)
            new_memory.append(nodes)
        logits = self.head(self.norm_out(x))
        return logits, StepState(torch.cat(new_memory, dim=1).unflatten(1, (cfg.n_layer, cfg.n_slots, cfg.n_embd)), state.pointer + 1)
