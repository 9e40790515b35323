"""`lmn-train`: train a preset on any UTF-8 text with the paper's recipe (AdamW, 90/10 split).

Runs on cpu, cuda or mps (--device), in fp32 or under bf16/fp16 autocast with fp32 master weights
(--precision), optionally torch.compile'd (--compile), with --grad-accum micro-batches per step.
Runs unchanged under `torchrun` (DDP: nccl on cuda, each rank on cuda:LOCAL_RANK; gloo otherwise):
each rank draws its own batches, rank 0 evaluates, logs and writes the checkpoint; --resume works
across a change of world size (the optimizer state of DDP is the same on every rank).

Nothing is lost to a kill: the checkpoint (weights, optimizer state, config) is replaced as one
unit (see models.checkpoint), a log line is appended only after the checkpoint it describes has
committed, and --resume trims log lines past the checkpoint and draws the batches the
uninterrupted run would have drawn, so it continues the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F

from runtime.atomic import write_atomic
from runtime.reader import excerpt

from . import build_model, count_parameters
from .checkpoint import CONFIG, OPTIMIZER, CheckpointError, load, load_optimizer_state, read_meta, recover, save
from .carry import CARRY_LEVELS, CarriedRows
from .config import PRESETS, ConfigError, GPTConfig, LMNConfig, preset
from .data import VOCAB_KINDS, Corpus, DataError, TrainingData, open_training_data
from .devices import Distributed, autocast, check_precision, grad_scaler, resolve_device

LOG = "train_log.jsonl"
__all__ = ["LOG", "OPTIMIZER", "TrainSettings", "TrainingError", "evaluate", "evaluate_checkpoint", "main", "train"]


class TrainingError(Exception):
    """Training that cannot go on (the loss diverged); the message says what to do."""


class Stopped(BaseException):
    """SIGTERM arrived; raised where the process is, so pending cleanup runs."""


@dataclass(frozen=True)
class Bound:
    """The values one setting accepts: whole numbers (kind int) or finite numbers (kind float) in a range."""

    kind: type
    low: float
    strict: bool = False  # refuse `low` itself
    high: float = math.inf

    def problem(self, value: Any) -> str | None:
        """Why `value` is refused, or None when it is accepted."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number (got {excerpt(value)})"
        if self.kind is int and not isinstance(value, int):
            return f"must be a whole number (got {excerpt(value)})"
        if not math.isfinite(value):
            return f"must be a finite number (got {value!r})"
        if value < self.low or (self.strict and value == self.low):
            return f"must be {'>' if self.strict else '>='} {self.low:g} (got {value!r})"
        if value > self.high:
            return f"must be <= {self.high:,} (got {excerpt(value)})"
        return None


@dataclass(frozen=True)
class OneOf:
    """The values one setting accepts: one of a few names (kind str), or a flag (kind bool)."""

    choices: tuple[Any, ...]
    kind: type = str

    def problem(self, value: Any) -> str | None:
        """Why `value` is refused, or None when it is accepted."""
        if type(value) is not self.kind or value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))} (got {value!r})"
        return None


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")


# The one validator for training settings: TrainSettings (API) and the click options (CLI) both use it.
# Upper bounds: far above any real run, low enough that step counters, token counts and tensor sizes
# stay exact int64 arithmetic (no overflow deep inside torch).
BOUNDS = {
    "steps": Bound(int, 1, high=10**9), "batch": Bound(int, 1, high=2**16), "block": Bound(int, 1, high=2**20),
    "lr": Bound(float, 0, strict=True), "weight_decay": Bound(float, 0), "grad_clip": Bound(float, 0),
    "eval_interval": Bound(int, 1, high=10**9), "eval_batches": Bound(int, 1, high=10**6),
    "seed": Bound(int, 0, high=2**64 - 1), "grad_accum": Bound(int, 1, high=2**16), "device": OneOf(DEVICES),
    "precision": OneOf(PRECISIONS), "compile": OneOf((False, True), kind=bool),
    "carry": Bound(int, 0, high=2**40), "carry_reset": Bound(float, 0, high=1.0),
}
LEVELS = Bound(int, 1, high=62)  # --levels: max_levels of an LMN (2^(levels-1) must fit int64)
THREADS = Bound(int, 1, high=1024)
DEFAULT_PRESET = "logmem-32"


@dataclass
class TrainSettings:
    """The training recipe; raises ConfigError (a ValueError) naming the first setting out of range."""

    steps: int = 5000
    batch: int = 16
    block: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: no clipping
    eval_interval: int = 100
    eval_batches: int = 200
    seed: int = 1337
    grad_accum: int = 1  # micro-batches per optimizer step
    device: str = "auto"  # auto: cuda if available, else mps, else cpu
    precision: str = "fp32"  # bf16/fp16: autocast over fp32 master weights
    compile: bool = False  # torch.compile the training forward
    carry: int = 0  # > 0: rows read stretches of this many tokens as consecutive windows, state carried (models.carry)
    carry_reset: float = 0.0  # with carry: the chance a row starts a window from the empty state
    levels: int | None = None  # max_levels of a new LMN (None: the preset's, or CARRY_LEVELS with carry)

    def __post_init__(self) -> None:
        for name, bound in BOUNDS.items():
            problem = bound.problem(getattr(self, name))
            if problem:
                raise ConfigError(f"TrainSettings.{name} {problem}")
        problem = self.levels is not None and LEVELS.problem(self.levels)
        if problem:
            raise ConfigError(f"TrainSettings.levels {problem}")
        if self.carry_reset and not self.carry:
            raise ConfigError("--carry-reset applies to carried state: add --carry STRETCH (or drop --carry-reset)")


class Bounded(click.ParamType):
    """A click option type: parses a value and refuses what its Bound (or OneOf) refuses."""

    def __init__(self, bound: Bound | OneOf) -> None:
        self.bound = bound
        self.name = "choice" if isinstance(bound, OneOf) else "integer" if bound.kind is int else "number"

    def get_metavar(self, param, ctx=None):
        return f"[{'|'.join(self.bound.choices)}]" if isinstance(self.bound, OneOf) else None

    def convert(self, value, param, ctx):
        parsed = value
        if isinstance(value, str):
            try:
                parsed = self.bound.kind(value)
            except ValueError:  # int() of over 4,300 digits included
                self.fail(f"{excerpt(value)} is not a {'whole ' if self.bound.kind is int else ''}number", param, ctx)
        problem = self.bound.problem(parsed)
        if problem:
            self.fail(problem, param, ctx)
        return parsed


class OneLineErrors(click.Command):
    """A command whose bad option values are one line ("Error: Invalid value for '--x': ..."), no usage banner."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.BadParameter as e:
            raise click.ClickException(e.format_message()) from None


def placement(settings: TrainSettings, local_rank: int = 0) -> torch.device:
    """The device these settings train on, checked against their precision."""
    device = resolve_device(settings.device, local_rank)
    check_precision(settings.precision, device)
    return device


def is_compile_error(error: BaseException) -> bool:
    """Whether `error` came from torch.compile (dynamo tracing or the backend compiler)."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor"))


def compile_failed(error: BaseException) -> TrainingError:
    """A one-line TrainingError naming what torch.compile's backend (or dynamo) raised."""
    cause = getattr(error, "inner_exception", None) or error  # BackendCompilerFailed wraps the backend's error
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return TrainingError(f"--compile failed ({type(cause).__name__}: {first}); run without --compile")


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The batch sampler of one step: a function of (seed, rank, step) alone, so a resumed run draws what an unbroken one would."""
    digest = hashlib.sha256(f"lmn-train:{seed}:{rank}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@torch.no_grad()
def evaluate(model, corpus: Corpus, settings: TrainSettings, batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy (nats/char) over `batches` random windows of each split (fixed seed), on the
    model's device and under the autocast of settings.precision, as training ran."""
    device = next(model.parameters()).device
    model.eval()
    generator = torch.Generator().manual_seed(settings.seed + 1)
    losses = {}
    for name, split in (("train", corpus.train), ("val", corpus.val)):
        total = 0.0
        n = batches or settings.eval_batches
        for _ in range(n):
            x, y = Corpus.batch(split, settings.batch, settings.block, generator)  # (B, T), (B, T)
            x, y = x.to(device), y.to(device)
            with autocast(device, settings.precision):
                total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).float().item()
        losses[name] = total / n
    model.train()
    return losses


CARRY_KEY = "lmn_carry"  # the carried states' entry in the optimizer state file: a list, one per rank


def with_levels(cfg, settings: TrainSettings):
    """The preset's config with --levels (or, with --carry, CARRY_LEVELS) as max_levels; a GPT takes neither."""
    levels = settings.levels if settings.levels is not None else (CARRY_LEVELS if settings.carry else None)
    if levels is None:
        return cfg
    if not isinstance(cfg, LMNConfig):
        raise ConfigError("--levels sets an LMN's memory levels; a GPT preset has none (drop --levels)")
    return dataclasses.replace(cfg, max_levels=levels)


def gather_carry(rows: CarriedRows, dist: Distributed) -> list[dict]:
    """Every rank's carried states (cpu), in rank order (one collective call under DDP: every rank calls it)."""
    mine = rows.state_dict()
    if dist.world_size == 1:
        return [mine]
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def restore_carry(rows: CarriedRows | None, carried: list[dict] | None, dist: Distributed) -> None:
    """This rank's carried states from a resumed checkpoint; a run with --carry needs a checkpoint trained with it."""
    if rows is None:
        return
    if carried is None or len(carried) != dist.world_size:
        have = "no carried states" if carried is None else f"carried states of {len(carried)} rank(s)"
        raise ConfigError(f"--resume --carry: the checkpoint holds {have}, this run has {dist.world_size} rank(s); "
                          "resume with the --carry and the number of processes it was trained with")
    rows.load_state_dict(carried[dist.rank])


def restore_optimizer(optimizer: torch.optim.Optimizer, out: Path, meta: dict[str, Any], settings: TrainSettings) -> list | None:
    """Load the optimizer state saved with the checkpoint (if it saved one); this run's lr and weight decay apply.
    Returns the carried states it holds (`CARRY_KEY`), or None."""
    state = load_optimizer_state(out, meta)
    carried = state.pop(CARRY_KEY, None) if isinstance(state, dict) else None
    if state is not None:
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{out / OPTIMIZER} does not fit this model ({e}); restore the checkpoint folder") from None
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = settings.lr, settings.weight_decay
    return carried


@contextlib.contextmanager
def log_errors(path: Path) -> Iterator[None]:
    """Turn a failed write to the log into a one-line CheckpointError."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}); free some space or make the folder "
                              "writable, then continue with --resume (the checkpoint is saved)") from None


def logged_step(line: str) -> int | None:
    """The step a log line records; None for a torn or foreign line."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def trim_log(path: Path, step: int, record: dict[str, Any] | None) -> None:
    """Make the log describe the checkpoint at `step`: drop lines past it (and torn ones), and add
    its own line (`record`, kept in config.json) when a kill came between the commit and the append."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    kept = [line for line in lines if (logged := logged_step(line)) is not None and logged <= step]
    if record is not None and all(logged_step(line) != step for line in kept):
        kept.append(json.dumps(record, allow_nan=False))
    if kept != lines:
        with log_errors(path):
            write_atomic(path, "".join(line + "\n" for line in kept))


def append_log(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and make it durable."""
    line = json.dumps(record, allow_nan=False) + "\n"
    with log_errors(path), open(path, "a", encoding="utf-8") as log:
        log.write(line)
        log.flush()
        os.fsync(log.fileno())


def check_finite(step: int, values: torch.Tensor, dist: Distributed, settings: TrainSettings, saved: int) -> None:
    """Stop the run, on every rank, when the loss or gradient norm of `step` is NaN or infinite.

    Under fp16 loss scaling `values` is the loss alone: an infinite gradient norm there is the
    GradScaler's overflow, whose step it skips (lowering the scale), not a diverged run.
    """
    values = values.detach().clone()  # (2,): loss, gradient norm; or (1,): loss
    if dist.world_size > 1:
        if dist.backend == "gloo":
            values = values.cpu()
        torch.distributed.all_reduce(values)  # a NaN or inf on any rank survives the sum
    if not torch.isfinite(values).all():
        raise TrainingError(diverged(step, settings, saved))


def diverged(step: int, settings: TrainSettings, saved: int) -> str:
    then = f"--resume from the last checkpoint (step {saved}), which is kept" if saved else "start again"
    return f"the loss became NaN or infinite at step {step}; lower --lr (now {settings.lr:g}) and {then}"


@dataclass
class Run:
    """One training run as set up: what each step reads and updates, and what each checkpoint saves."""

    settings: TrainSettings
    out: Path
    dist: Distributed
    device: torch.device
    preset_name: str
    model: torch.nn.Module  # the plain module: evaluation and checkpoints
    trained: torch.nn.Module  # what a step calls: `model`, wrapped in DDP and/or torch.compile
    ddp: torch.nn.parallel.DistributedDataParallel | None
    vocab: Any
    corpus: Corpus
    rows: CarriedRows | None  # --carry: each batch row's stretch and carried state
    optimizer: torch.optim.Optimizer
    scaler: Any  # fp16 loss scaling (torch.amp.GradScaler), else None
    facts: dict[str, Any]  # how the run trains, recorded in config.json and every log line
    done: int  # the step of the last checkpoint
    tokens: int  # trained on so far, across world sizes

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.settings, self.dist)


def tokens_per_step(settings: TrainSettings, dist: Distributed) -> int:
    """Tokens one optimizer step trains on, over every micro-batch and process."""
    return settings.batch * settings.block * settings.grad_accum * dist.world_size


def start_model(data: TrainingData, out: Path, preset_name: str | None, settings: TrainSettings, resume: bool,
                init: Path | None) -> tuple[torch.nn.Module, Any, dict[str, Any], str]:
    """The model to train, its vocabulary, the checkpoint's metadata and the preset name: resumed from `out`,
    started from `init`'s weights, or a new `preset_name` model."""
    if resume:
        model, vocab, meta = load(out)
        model.train()
        saved = meta["training"].get("preset")
        if preset_name is not None and saved is not None and preset_name != saved:
            raise ConfigError(f"--resume: the checkpoint in {out} is a {saved} model, not --preset {preset_name}; "
                              f"drop --preset (or pass --preset {saved}), or train {preset_name} in another --out")
        levels = getattr(model.config, "max_levels", None)
        if settings.levels is not None and settings.levels != levels:
            raise ConfigError(f"--resume: the checkpoint in {out} has {levels} levels, not --levels {settings.levels}; "
                              "drop --levels, or train another --out")
        return model, vocab, meta, saved or preset_name or DEFAULT_PRESET
    if init is not None:  # a new run from another checkpoint's weights (its vocabulary, a fresh optimizer)
        start, vocab, start_meta = load(init)
        model = build_model(with_levels(start.config, settings))  # the weights do not depend on max_levels
        model.load_state_dict(start.state_dict())
        model.train()
        return model, vocab, {"training": {}}, preset_name or start_meta["training"].get("preset") or DEFAULT_PRESET
    preset_name = preset_name or DEFAULT_PRESET
    cfg = with_levels(preset(preset_name, vocab_size=len(data.vocab)), settings)
    torch.manual_seed(settings.seed)
    return build_model(cfg), data.vocab, {"training": {}}, preset_name


def set_up(model, vocab, meta: dict[str, Any], preset_name: str, data: TrainingData, out: Path,
           settings: TrainSettings, resume: bool, dist: Distributed, device: torch.device) -> Run:
    """Place the model, build the optimizer (and restore its state and the carried rows on --resume), wrap
    the model for DDP and torch.compile, and trim the log to the checkpoint."""
    if isinstance(model.config, GPTConfig) and settings.block > model.config.block_size:
        raise ConfigError(f"--block {settings.block} exceeds the GPT position table ({model.config.block_size} rows)")
    corpus = data.corpus(vocab)  # a resumed checkpoint's vocabulary must match the data's
    corpus.check_block(settings.block)
    rows = None
    if settings.carry:
        CarriedRows.check(len(corpus.train), settings.carry)
        rows = CarriedRows(settings.carry, settings.block, settings.batch, settings.grad_accum, settings.seed, dist.rank,
                           settings.carry_reset)
    model.to(device)  # fp32 master weights on every device; autocast lowers only the matmuls
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if resume:
        carried = restore_optimizer(optimizer, out, meta, settings)  # its state lands on the parameters' device
        restore_carry(rows, carried, dist)
    trained, ddp = model, None
    if dist.world_size > 1:
        trained = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        trained = torch.compile(trained)  # lazy: compiles (or fails) on the first step; `model` stays plain
    scaler = grad_scaler(device, settings.precision)
    saved_scale = meta["training"].get("grad_scaler")
    if scaler is not None and saved_scale and isinstance(saved_scale, dict):
        with contextlib.suppress(RuntimeError, KeyError, TypeError, ValueError):  # unusable: recalibrate from 2^16
            scaler.load_state_dict(saved_scale)
    done = int(meta["training"].get("step", 0))
    if dist.main:
        trim_log(out / LOG, done, meta["training"].get("last_log"))
    facts = {"device": device.type, "precision": settings.precision, "grad_accum": settings.grad_accum,
             "carry": settings.carry, "carry_reset": settings.carry_reset,
             "compile": settings.compile, "world_size": dist.world_size}
    last_log = meta["training"].get("last_log") or {}
    tokens = int(last_log.get("tokens", done * tokens_per_step(settings, dist)))  # trained on so far, any world size
    return Run(settings, out, dist, device, preset_name, model, trained, ddp, vocab, corpus, rows, optimizer, scaler,
               facts, done, tokens)


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step (step index `step`, 0-based): its micro-batches, clipping, the divergence check and
    the update. Returns the step's loss, the mean over its windows."""
    settings = run.settings
    # Micro-batch k of a step is the k-th draw from the step's generator, so --grad-accum 1 draws
    # what it always did, and two micro-batches of B windows are the windows of one of 2B.
    generator = step_generator(settings.seed, run.dist.rank, step)
    run.optimizer.zero_grad(set_to_none=True)
    batch_loss = torch.zeros((), device=run.device)  # the step's summed micro-batch losses
    for micro in range(settings.grad_accum):
        if run.rows is None:
            x, y = Corpus.batch(run.corpus.train, settings.batch, settings.block, generator)
        else:  # the next window of each row's stretch, from the state its last window left
            x, y, state_in = run.rows.batch_at(run.corpus.train, step, micro, run.model)
        x, y = x.to(run.device), y.to(run.device)  # (B, T), (B, T)
        syncs = run.ddp is None or micro + 1 == settings.grad_accum  # DDP all-reduces on the last only
        try:
            with contextlib.nullcontext() if syncs else run.ddp.no_sync():
                with autocast(run.device, settings.precision):
                    if run.rows is None:
                        logits = run.trained(x)
                    else:
                        logits, after = run.trained(x, return_state=True, state=state_in)
                        run.rows.keep(micro, after)
                    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                scaled = loss / settings.grad_accum if settings.grad_accum > 1 else loss
                (scaled if run.scaler is None else run.scaler.scale(scaled)).backward()
        except Exception as e:
            if settings.compile and is_compile_error(e):
                raise compile_failed(e) from None
            raise
        batch_loss = batch_loss + loss.detach().float()
    if settings.grad_accum > 1:
        batch_loss = batch_loss / settings.grad_accum  # the mean over the step's windows
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients; notes an overflow for scaler.step
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.grad_clip or math.inf)
    watched = batch_loss.reshape(1) if run.scaler is not None else torch.stack([batch_loss, norm])
    check_finite(step + 1, watched, run.dist, settings, run.done)
    if run.scaler is None:
        run.optimizer.step()
    else:
        run.scaler.step(run.optimizer)  # skipped when unscale_ found an inf/NaN gradient
        run.scaler.update()
    run.tokens += run.tokens_per_step
    return batch_loss


def save_checkpoint(run: Run, step: int, losses: dict[str, float], record: dict[str, Any], carried: list | None) -> None:
    """Replace the checkpoint in run.out with the run at `step`, then append its log line (only once it has committed)."""
    facts = {
        "preset": run.preset_name, "step": step, "parameters": count_parameters(run.model),
        **{f"{k}_loss": round(v, 4) for k, v in losses.items()},
        "settings": dataclasses.asdict(run.settings), **run.facts, "tokens": run.tokens, "last_log": record,
    }
    if run.scaler is not None:
        facts["grad_scaler"] = run.scaler.state_dict()
    state = run.optimizer.state_dict()
    if carried is not None:  # every rank's carried states, in rank order
        state = {**state, CARRY_KEY: carried}
    save(run.out, run.model, run.vocab, facts, state)  # the plain module: cpu fp32 tensors, no _orig_mod. keys
    append_log(run.out / LOG, record)
    run.done = step


def train(
    data: TrainingData,
    out: Path,
    preset_name: str | None,
    settings: TrainSettings,
    resume: bool = False,
    progress: bool = True,
    dist: Distributed | None = None,
    init: Path | None = None,
) -> dict[str, float]:
    """Train (or resume) a model on `data` (`open_training_data`), writing a checkpoint to `out`. Returns final losses.

    `preset_name` None: DEFAULT_PRESET, or a resumed checkpoint's own (another one is refused). A resumed
    checkpoint already at `settings.steps` or past it trains nothing and returns the losses it recorded.
    `init`: a new run that starts from that checkpoint's weights and vocabulary (its config, with
    `settings.levels` if given: an LMN's weights do not depend on its number of levels), a fresh optimizer.
    """
    dist = dist or Distributed()
    device = placement(settings, dist.local_rank)
    out = Path(out)
    model, vocab, meta, preset_name = start_model(data, out, preset_name, settings, resume, init)
    if settings.carry and not isinstance(model.config, LMNConfig):
        raise ConfigError(f"--carry trains an LMN's memory across windows; {preset_name} has none (drop --carry)")
    if resume and int(meta["training"].get("step", 0)) >= settings.steps:  # nothing to train: its own losses, never NaN
        return recorded_losses(meta)
    run = set_up(model, vocab, meta, preset_name, data, out, settings, resume, dist, device)

    losses = {"train": math.nan, "val": math.nan}
    start = time.time()
    show = progress and dist.main
    run_tokens, run_s = 0, 0.0  # trained by this run (evaluation excluded): the progress bar's tokens/s
    window_tokens, window_s = 0, 0.0  # the same since the last log line: its tokens_per_s

    def status(step):
        if step is None:
            return ""
        rate = f" {run_tokens / run_s:,.0f} tok/s" if run_s > 0 else ""
        return f"train {losses['train']:.4f} val {losses['val']:.4f}{rate}"

    with open(os.devnull, "w") as devnull, click.progressbar(
        range(run.done, settings.steps), label=f"training {preset_name}", item_show_func=status,
        file=sys.stderr if show else devnull,
    ) as bar:
        for step in bar:
            tick = time.perf_counter()
            batch_loss = train_step(run, step)
            seconds = time.perf_counter() - tick
            run_tokens, run_s = run_tokens + run.tokens_per_step, run_s + seconds
            window_tokens, window_s = window_tokens + run.tokens_per_step, window_s + seconds
            at_checkpoint = (step + 1) % settings.eval_interval == 0 or step + 1 == settings.steps
            if not at_checkpoint:
                continue
            carried = gather_carry(run.rows, dist) if run.rows is not None else None  # every rank calls it
            if dist.main:
                losses = evaluate(model, run.corpus, settings)
                if not all(math.isfinite(v) for v in losses.values()):
                    raise TrainingError(diverged(step + 1, settings, run.done))
                record = {"step": step + 1, "train_loss": losses["train"], "val_loss": losses["val"],
                          "batch_loss": batch_loss.item(), "elapsed_s": round(time.time() - start, 1),
                          "tokens": run.tokens,
                          "tokens_per_s": round(window_tokens / window_s, 1) if window_s else 0.0, **run.facts}
                save_checkpoint(run, step + 1, losses, record, carried)
                window_tokens, window_s = 0, 0.0
    return losses


def recorded_losses(meta: dict[str, Any]) -> dict[str, float | None]:
    """The train and val losses a checkpoint recorded (None where it recorded none)."""
    return {split: meta["training"].get(f"{split}_loss") for split in ("train", "val")}


def evaluate_checkpoint(data: TrainingData, out: Path, settings: TrainSettings) -> dict[str, float]:
    """Evaluate a saved checkpoint on `data` (same split and block) and record the result beside it."""
    model, vocab, meta = load(out)
    model.to(placement(settings, Distributed.env_local_rank()))
    optimizer_state = load_optimizer_state(out, meta)
    corpus = data.corpus(vocab)
    corpus.check_block(settings.block)
    losses = evaluate(model, corpus, settings)
    if not all(math.isfinite(v) for v in losses.values()):
        raise TrainingError(f"the checkpoint in {out} gives a NaN or infinite loss; re-train it with a lower --lr")
    meta["training"][f"eval_{settings.eval_batches}_batches"] = {f"{k}_loss": round(v, 4) for k, v in losses.items()}
    save(out, model, vocab, meta["training"], optimizer_state)
    return losses


def check_out(out: Path, resume: bool, evaluate_only: bool) -> None:
    """Refuse, in one line and before any work, an --out that does not fit the request."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the checkpoint")
    if out.is_dir():
        recover(out)
    has_checkpoint = (out / CONFIG).is_file()
    if resume and not has_checkpoint:
        raise CheckpointError(f"--resume: {out} holds no checkpoint; drop --resume to start one")
    if evaluate_only and not has_checkpoint:
        raise CheckpointError(f"--evaluate: {out} holds no checkpoint")
    if not resume and not evaluate_only and has_checkpoint:
        raise CheckpointError(f"{out} already holds a checkpoint; pass --resume or choose another --out")


def prepare_out(out: Path) -> None:
    """Create --out; refuse one this process cannot write to (read-only file system, no permission)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror or e}); choose a folder you can write to") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} is not writable (read-only file system or no permission); "
                          "choose a folder you can write to")


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into the Stopped exception while inside, so a half-written checkpoint is cleaned up."""
    def stop(signum, frame):
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command(cls=OneLineErrors)
@click.option("--data", "source", required=True, help="UTF-8 text file, http(s) URL, or a folder from lmn-prepare.")
@click.option("--vocab", "vocab_kind", type=click.Choice(VOCAB_KINDS), default=None,
              help="chars (a text's default) or bytes; default for a prepared folder or --resume: theirs.")
@click.option("--preset", "preset_name", type=click.Choice(list(PRESETS)), default=None,
              help=f"Model to train (default {DEFAULT_PRESET}; with --resume: the checkpoint's, and no other).")
@click.option("--steps", type=Bounded(BOUNDS["steps"]), default=5000, show_default=True, help="Total optimizer steps.")
@click.option("--batch", type=Bounded(BOUNDS["batch"]), default=16, show_default=True)
@click.option("--block", type=Bounded(BOUNDS["block"]), default=512, show_default=True, help="Training context in characters.")
@click.option("--lr", type=Bounded(BOUNDS["lr"]), default=1e-3, show_default=True)
@click.option("--seed", type=Bounded(BOUNDS["seed"]), default=1337, show_default=True)
@click.option("--eval-interval", type=Bounded(BOUNDS["eval_interval"]), default=100, show_default=True)
@click.option("--eval-batches", type=Bounded(BOUNDS["eval_batches"]), default=200, show_default=True,
              help="Batches per split at each eval.")
@click.option("--threads", type=Bounded(THREADS), default=None, help="CPU threads per process (default: all cores).")
@click.option("--device", type=Bounded(BOUNDS["device"]), default="auto", show_default=True,
              help="auto: cuda if available, else mps, else cpu. Under torchrun each rank uses cuda:LOCAL_RANK.")
@click.option("--precision", type=Bounded(BOUNDS["precision"]), default="fp32", show_default=True,
              help="bf16/fp16: autocast over fp32 master weights (fp16 adds loss scaling; GPU only).")
@click.option("--compile", "compiled", is_flag=True, help="torch.compile the model for training (slow first step).")
@click.option("--grad-accum", type=Bounded(BOUNDS["grad_accum"]), default=1, show_default=True,
              help="Micro-batches of --batch per optimizer step (loss scaled by 1/N).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder.")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out up to --steps.")
@click.option("--evaluate", "evaluate_only", is_flag=True,
              help="Only evaluate the checkpoint in --out over --eval-batches batches per split and record it.")
@click.option("--carry", type=Bounded(BOUNDS["carry"]), default=0, show_default=True,
              help="LMN: each row reads a stretch of this many tokens as consecutive --block windows, the state one "
                   "window leaves (detached) starting the next, so memory levels beyond a window train (0: random "
                   "windows from the empty state).")
@click.option("--carry-reset", type=Bounded(BOUNDS["carry_reset"]), default=0.0, show_default=True,
              help="With --carry: the chance that a row starts a window from the empty state (its stretch goes on), so a "
                   "stream's first tokens keep training.")
@click.option("--levels", type=Bounded(LEVELS), default=None,
              help=f"LMN: memory levels (max_levels; level i holds 2^i tokens). Default: the preset's, or {CARRY_LEVELS} "
                   f"with --carry (reaches 2^{CARRY_LEVELS - 1} tokens).")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None,
              help="Start a new run from this checkpoint's weights and vocabulary (e.g. to train the shipped model "
                   "further with --carry and more --levels); a fresh optimizer.")
@click.option("--json", "as_json", is_flag=True, help="Print the final losses as JSON.")
def main(source, vocab_kind, preset_name, steps, batch, block, lr, seed, eval_interval, eval_batches, threads, out, resume,
         evaluate_only, as_json, device, precision, compiled, grad_accum, carry, carry_reset, levels, init):
    """Train an LMN (or a baseline) on a text; writes model.safetensors, config.json, train_log.jsonl."""
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // Distributed.env_world_size()))
    dist = Distributed()
    try:
        settings = TrainSettings(steps=steps, batch=batch, block=block, lr=lr, seed=seed,
                                 eval_interval=eval_interval, eval_batches=eval_batches, grad_accum=grad_accum,
                                 device=device, precision=precision, compile=compiled, carry=carry, carry_reset=carry_reset,
                                 levels=levels)
        dist = Distributed.from_env(placement(settings, Distributed.env_local_rank()))
        check_out(out, resume, evaluate_only)
        if init is not None and (resume or evaluate_only):
            raise ConfigError("--init starts a new run from another checkpoint; --resume and --evaluate use --out's own")
        if init is not None:
            read_meta(init)  # a checkpoint folder, before any work
        done = int(read_meta(out)["training"].get("step", 0)) if resume else 0
        data = open_training_data(source, vocab_kind)
        prepare_out(out)
        with stop_on_sigterm():
            if evaluate_only:
                losses = evaluate_checkpoint(data, out, settings)
            else:
                losses = train(data, out, preset_name, settings, resume=resume, dist=dist, init=init)
        if dist.world_size > 1:
            # Ranks leave together, once rank 0's last checkpoint is written: a rank that tears gloo down while its
            # peer is still busy can abort on the peer's closed connection.
            torch.distributed.barrier()
    except (DataError, CheckpointError, ConfigError, TrainingError) as e:
        raise click.ClickException(str(e)) from None
    except Stopped:
        click.echo(f"stopped by SIGTERM; {out} keeps its last whole checkpoint: continue it with --resume", err=True)
        sys.exit(128 + signal.SIGTERM)
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
    if dist.main:
        idle = resume and not evaluate_only and done >= steps
        if as_json:
            click.echo(json.dumps({"out": str(out), **{f"{k}_loss": v for k, v in losses.items()},
                                   **({"nothing_to_do": True, "steps_done": done} if idle else {})}, allow_nan=False))
        else:
            if idle:
                click.echo(f"nothing to do: {out} is at step {done}, --steps is {steps}; pass a larger --steps to "
                           "train on", err=True)
            shown = {k: "none recorded" if v is None else f"{v:.4f}" for k, v in losses.items()}
            click.echo(f"{out}: train loss {shown['train']}, val loss {shown['val']} (nats/char)")


if __name__ == "__main__":
    main()
