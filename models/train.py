"""`lmn-train`: train a preset on any UTF-8 text with the paper's recipe (AdamW, 90/10 split).

Runs unchanged under `torchrun` (DDP over the gloo backend): each rank draws its own batches,
rank 0 evaluates, logs and writes the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from . import build_model, count_parameters
from .checkpoint import CONFIG, CheckpointError, load, save
from .config import PRESETS, ConfigError, GPTConfig, preset
from .data import CharVocab, Corpus, DataError, load_text

OPTIMIZER = "optimizer.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainSettings:
    steps: int = 5000
    batch: int = 16
    block: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 200
    seed: int = 1337


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        torch.distributed.init_process_group("gloo")
        return cls(torch.distributed.get_rank(), world)

    @property
    def main(self) -> bool:
        return self.rank == 0


@torch.no_grad()
def evaluate(model, corpus: Corpus, settings: TrainSettings, batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy (nats/char) over `batches` random windows of each split (fixed seed)."""
    model.eval()
    generator = torch.Generator().manual_seed(settings.seed + 1)
    losses = {}
    for name, split in (("train", corpus.train), ("val", corpus.val)):
        total = 0.0
        n = batches or settings.eval_batches
        for _ in range(n):
            x, y = Corpus.batch(split, settings.batch, settings.block, generator)
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        losses[name] = total / n
    model.train()
    return losses


def train(
    text: str,
    out: Path,
    preset_name: str,
    settings: TrainSettings,
    resume: bool = False,
    progress: bool = True,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """Train (or resume) a model on `text`, writing a checkpoint to `out`. Returns final losses."""
    dist = dist or Distributed()
    if resume:
        model, vocab, meta = load(out)
        model.train()
        done = int(meta["training"].get("step", 0))
        preset_name = meta["training"].get("preset", preset_name)
    else:
        vocab = CharVocab.from_text(text)
        cfg = preset(preset_name, vocab_size=len(vocab))
        torch.manual_seed(settings.seed)
        model = build_model(cfg)
        done = 0
    if isinstance(model.config, GPTConfig) and settings.block > model.config.block_size:
        raise ConfigError(f"--block {settings.block} exceeds the GPT position table ({model.config.block_size} rows)")
    corpus = Corpus.from_text(text, vocab)
    corpus.check_block(settings.block)

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if resume and (out / OPTIMIZER).is_file():
        optimizer.load_state_dict(torch.load(out / OPTIMIZER, weights_only=True))
    trained = model
    if dist.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(settings.seed + 1000 * (dist.rank + 1) + done)

    def checkpoint(step: int, losses: dict[str, float]) -> None:
        facts = {
            "preset": preset_name, "step": step, "parameters": count_parameters(model),
            **{f"{k}_loss": round(v, 4) for k, v in losses.items()},
            "settings": settings.__dict__, "world_size": dist.world_size,
        }
        save(out, model, vocab, facts)
        torch.save(optimizer.state_dict(), out / OPTIMIZER)

    log = open(out / LOG, "a", encoding="utf-8") if dist.main else None
    losses = {"train": math.nan, "val": math.nan}
    start = time.time()
    steps = range(done, settings.steps)
    show = progress and dist.main

    def status(step):
        return f"train {losses['train']:.4f} val {losses['val']:.4f}" if step is not None else ""

    with click.progressbar(steps, label=f"training {preset_name}", item_show_func=status,
                           file=sys.stderr if show else open(os.devnull, "w")) as bar:
        for step in bar:
            x, y = Corpus.batch(corpus.train, settings.batch, settings.block, generator)
            loss = F.cross_entropy(trained(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            last = step + 1 == settings.steps
            if dist.main and ((step + 1) % settings.eval_interval == 0 or last):
                losses = evaluate(model, corpus, settings)
                record = {"step": step + 1, "train_loss": losses["train"], "val_loss": losses["val"],
                          "batch_loss": loss.item(), "elapsed_s": round(time.time() - start, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                checkpoint(step + 1, losses)
    if dist.main:
        log.close()
    return losses


def evaluate_checkpoint(text: str, out: Path, settings: TrainSettings) -> dict[str, float]:
    """Evaluate a saved checkpoint on `text` (same split and block) and record the result beside it."""
    model, vocab, meta = load(out)
    corpus = Corpus.from_text(text, vocab)
    corpus.check_block(settings.block)
    losses = evaluate(model, corpus, settings)
    meta["training"][f"eval_{settings.eval_batches}_batches"] = {f"{k}_loss": round(v, 4) for k, v in losses.items()}
    save(out, model, vocab, meta["training"])
    return losses


@click.command()
@click.option("--data", "source", required=True, help="UTF-8 text file or http(s) URL.")
@click.option("--preset", "preset_name", type=click.Choice(list(PRESETS)), default="logmem-32", show_default=True)
@click.option("--steps", default=5000, show_default=True, help="Total optimizer steps.")
@click.option("--batch", default=16, show_default=True)
@click.option("--block", default=512, show_default=True, help="Training context in characters.")
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=1337, show_default=True)
@click.option("--eval-interval", default=100, show_default=True)
@click.option("--eval-batches", default=200, show_default=True, help="Batches per split at each eval.")
@click.option("--threads", type=int, default=None, help="CPU threads per process (default: all cores).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder.")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out up to --steps.")
@click.option("--evaluate", "evaluate_only", is_flag=True,
              help="Only evaluate the checkpoint in --out over --eval-batches batches per split and record it.")
@click.option("--json", "as_json", is_flag=True, help="Print the final losses as JSON.")
def main(source, preset_name, steps, batch, block, lr, seed, eval_interval, eval_batches, threads, out, resume,
         evaluate_only, as_json):
    """Train an LMN (or a baseline) on a text; writes model.safetensors, config.json, train_log.jsonl."""
    dist = Distributed.from_env()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // dist.world_size))
    settings = TrainSettings(steps=steps, batch=batch, block=block, lr=lr, seed=seed,
                             eval_interval=eval_interval, eval_batches=eval_batches)
    try:
        if resume and not (out / CONFIG).is_file():
            raise CheckpointError(f"--resume: {out} holds no checkpoint; drop --resume to start one")
        if evaluate_only and not (out / CONFIG).is_file():
            raise CheckpointError(f"--evaluate: {out} holds no checkpoint")
        if not resume and not evaluate_only and (out / CONFIG).is_file():
            raise CheckpointError(f"{out} already holds a checkpoint; pass --resume or choose another --out")
        text = load_text(source)
        if evaluate_only:
            losses = evaluate_checkpoint(text, out, settings)
        else:
            out.mkdir(parents=True, exist_ok=True)
            losses = train(text, out, preset_name, settings, resume=resume, dist=dist)
    except (DataError, CheckpointError, ConfigError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
    if dist.main:
        if as_json:
            click.echo(json.dumps({"out": str(out), **{f"{k}_loss": v for k, v in losses.items()}}))
        else:
            click.echo(f"{out}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (nats/char)")


if __name__ == "__main__":
    main()
