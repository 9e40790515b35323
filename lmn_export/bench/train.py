"""The `train` section: training throughput (tokens/s) of LMN and GPT-2 presets of the same width."""

from __future__ import annotations

import statistics
import time

from .settings import TrainSettings

TRAIN_PAIRS = (("logmem-32", "gpt2-32"), ("logmem-128", "gpt2-128"))  # (LMN, GPT-2) of the same width


def train_device(name: str) -> str:
    """`--device`: the name itself, or for `auto` the first of cuda, mps, cpu that this machine has."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def train_block(cfg, block: int) -> int:
    """The block a preset trains at: `block`, or a GPT-2's position table if that is shorter."""
    return min(block, cfg.block_size) if hasattr(cfg, "block_size") else block


def bench_train(t: TrainSettings, threads: int, seed: int, log) -> list[dict]:
    """Training throughput, tokens per second (forward, cross-entropy, backward, AdamW step), of each
    preset in TRAIN_PAIRS: the median over `t.rounds` rounds of `t.steps` steps each, after one
    warm-up step, the presets interleaved in every round. fp32, `threads` torch threads on the CPU."""
    import torch
    import torch.nn.functional as F

    from models import build_model
    from models.config import preset

    device = train_device(t.device)
    sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}.get(device, lambda: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps, blocks = {}, {}
        for name in (name for pair in TRAIN_PAIRS for name in pair):
            torch.manual_seed(seed)
            cfg = preset(name)
            blocks[name] = block = train_block(cfg, t.block)
            model = build_model(cfg).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            tokens = torch.randint(cfg.vocab_size, (t.batch, block + 1), generator=torch.Generator().manual_seed(seed))
            inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

            def step(model=model, optimizer=optimizer, inputs=inputs, targets=targets):
                loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            log(f"train: {name} on {device}, batch {t.batch} x block {block}: warm-up step")
            step()
            steps[name] = step
        sync()
        rates = {name: [] for name in steps}
        for r in range(t.rounds):
            log(f"train: round {r + 1} of {t.rounds} ({t.steps} steps per preset)")
            for name, step in steps.items():
                began = time.perf_counter()
                for _ in range(t.steps):
                    step()
                sync()
                rates[name].append(t.batch * blocks[name] * t.steps / (time.perf_counter() - began))
    finally:
        torch.set_num_threads(previous)
    return [{"preset": name, "device": device, "precision": "fp32", "batch": t.batch, "block": blocks[name],
             "tokens_per_s": statistics.median(rates[name]), "round_tokens_per_s": rates[name],
             "threads": threads if device == "cpu" else None} for name in steps]


def train_ratios(rows: list[dict]) -> dict[str, float]:
    """{width: LMN tokens/s / GPT-2 tokens/s} for each pair in TRAIN_PAIRS."""
    from models.config import preset

    rate = {row["preset"]: row["tokens_per_s"] for row in rows}
    return {str(preset(lmn).n_embd): rate[lmn] / rate[gpt] for lmn, gpt in TRAIN_PAIRS if lmn in rate and gpt in rate}


