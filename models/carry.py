"""Training with carried state (`lmn-train --carry STRETCH`): each batch row reads consecutive windows of
one long stretch of the corpus, and the state the model leaves after one window (detached) starts the
next, so levels far deeper than a window are built, read and trained. Rows start a new stretch, from
the empty state, every `windows` steps, and (`reset`) any window from the empty state with some chance,
so that a stream's first tokens keep being trained too.

Everything a resumed run needs to draw what an unbroken one would is here: a stretch's start is a
function of (seed, rank, micro-batch, stretch number) alone, and the carried states are saved with
the checkpoint (`state_dict`), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError
from .lmn import StepState

# max_levels when --carry is given without --levels: level 20 holds blocks of 2^20 tokens.
CARRY_LEVELS = 21


def stretch_generator(seed: int, rank: int, micro: int, stretch: int) -> torch.Generator:
    """The sampler of one stretch's starts: a function of (seed, rank, micro-batch, stretch number) alone."""
    digest = hashlib.sha256(f"lmn-train-carry:{seed}:{rank}:{micro}:{stretch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class CarriedRows:
    """The rows one rank trains on with carried state: `micro` micro-batches of `batch` rows, each row a
    stretch of `windows` windows of `block` tokens."""

    stretch: int  # tokens a row reads from one stretch, its last window's targets included
    block: int
    batch: int
    micro: int
    seed: int
    rank: int = 0
    reset: float = 0.0  # chance that a row starts a window from the empty state (its stretch goes on)
    states: list[StepState | None] | None = None  # per micro-batch: the state after its last window (cpu or device)

    def __post_init__(self) -> None:
        if self.windows < 2:
            raise ConfigError(f"--carry {self.stretch} holds fewer than two windows of --block {self.block} "
                              f"(it needs >= {2 * self.block + 1} tokens): give a longer --carry")
        if self.states is None:
            self.states = [None] * self.micro

    @property
    def windows(self) -> int:
        """Windows per stretch: a window reads block + 1 tokens (its targets), the next starts block later."""
        return (self.stretch - 1) // self.block

    @staticmethod
    def check(split_tokens: int, stretch: int) -> None:
        if split_tokens <= stretch:
            raise ConfigError(f"--carry {stretch} needs a train split longer than that (it has {split_tokens} tokens): "
                              "use a shorter --carry or more text")

    def batch_at(self, split: np.ndarray, step: int, micro: int, model) -> tuple[torch.Tensor, torch.Tensor, StepState]:
        """Inputs (B, T), targets (B, T) and the starting state of micro-batch `micro` at optimizer step `step`:
        window step % windows of stretch step // windows (the empty state at a stretch's first window)."""
        number, window = divmod(step, self.windows)
        starts = torch.randint(len(split) - self.stretch, (self.batch,),
                               generator=stretch_generator(self.seed, self.rank, micro, number)).numpy()  # (B,)
        index = starts[:, None] + window * self.block + np.arange(self.block + 1)  # (B, T+1)
        tokens = torch.from_numpy(np.array(split[index], dtype=np.int64))  # (B, T+1)
        device = next(model.parameters()).device
        state = self.states[micro]
        if window == 0 or state is None:
            state = model.init_state(self.batch, device)
            if window:  # resumed without the states this step needs: refuse rather than train on a wrong state
                raise ConfigError("the checkpoint holds no carried states for this step; resume with the --carry "
                                  "it was trained with")
        state = StepState(state.memory.to(device), state.pointer.to(device))
        if self.reset and window:  # rows drawn (a function of seed, rank, micro-batch, step) start from the empty state
            drawn = torch.rand(self.batch, generator=stretch_generator(self.seed, self.rank, micro, -1 - step)) < self.reset
            keep = (~drawn).to(device)
            state = StepState(state.memory * keep.view(-1, 1, 1, 1).to(state.memory.dtype), state.pointer * keep)
        return tokens[:, :-1], tokens[:, 1:], state

    def keep(self, micro: int, state: StepState) -> None:
        """The state micro-batch `micro` left: detached (no gradient crosses windows), fp32 (autocast may lower it)."""
        self.states[micro] = StepState(state.memory.detach().float(), state.pointer.detach())

    def state_dict(self) -> dict:
        """What a checkpoint saves: the settings and the carried states (cpu)."""
        filled = [s for s in self.states if s is not None]
        return {"stretch": self.stretch, "block": self.block, "batch": self.batch, "micro": self.micro, "reset": self.reset,
                **({"memory": torch.stack([s.memory.cpu() for s in filled]),
                    "pointer": torch.stack([s.pointer.cpu() for s in filled])} if len(filled) == self.micro else {})}

    def load_state_dict(self, saved: dict) -> None:
        """Take the carried states of a checkpoint trained with the same --carry, --block, --batch, --grad-accum."""
        mine = {"stretch": self.stretch, "block": self.block, "batch": self.batch, "micro": self.micro, "reset": self.reset}
        theirs = {k: saved.get(k) for k in mine}
        if theirs != mine:
            raise ConfigError(f"--resume: the checkpoint was trained with carried state {theirs} (stretch, block, batch, "
                              f"micro-batches); this run asks for {mine}: resume with the same settings")
        if "memory" in saved:
            self.states = [StepState(m, p) for m, p in zip(saved["memory"], saved["pointer"])]
