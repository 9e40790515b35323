"""`lmn-bench`: LMN vs a same-size GPT-2 with a KV cache, decoding through onnxruntime on this CPU;
decode speed per model size and precision against this machine's bandwidth floor; and (section
`train`) training throughput of LMN and GPT-2 presets of the same width in PyTorch.

Everything is measured in one process, one run, side by side, so ratios are meaningful on a
noisy machine. Embedded-style defaults: one thread, one stream, warm-up excluded.
This module is the command line: every argument is checked where it enters, before any work.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import click
from click.core import ParameterSource

import runtime
from runtime.atomic import TEMP_MARK, resolve_target, write_atomic

from .decode_speed import (
    DEFAULT_PRECISIONS,
    EXPORT_PRESET,
    PRECISIONS,
    SpeedSettings,
    preset_names,
)
from .report import MATPLOTLIB_HINT, plot, print_report, results_json
from .reach import ReachSettings
from .recall import DISTANCES, RecallSettings
from .settings import (
    DEFAULT_SECTIONS,
    DEVICES,
    MAX_CONTEXT,
    SECTIONS,
    Settings,
    TrainSettings,
)
from .suite import run

# --- command-line arguments, each checked once where it enters (click callbacks), before any work ---


def parse_contexts(ctx, param, text: str) -> tuple[int, ...]:
    """Comma-separated token counts from 1 to 2**62, each kept once, ascending; --lmn-contexts may be empty."""
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    if not items:
        if param.name == "lmn_contexts":
            return ()
        raise click.BadParameter("give at least one context: comma-separated token counts, e.g. 1024,4096")
    values = []
    for item in items:
        if not item:
            raise click.BadParameter(f"{text!r} has an empty entry; give comma-separated token counts, e.g. 1024,4096")
        try:
            value = int(item)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not a token count; give comma-separated whole numbers, "
                                     "e.g. 1024,4096") from None
        if not 1 <= value <= MAX_CONTEXT:
            raise click.BadParameter(f"{value} is out of range: a context is 1 to 2**62 tokens")
        values.append(value)
    return tuple(sorted(set(values)))


def parse_presets(ctx, param, text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    allowed = preset_names()
    unknown = [name for name in names if name.partition("@")[0] not in allowed or (name.partition("@")[0] == EXPORT_PRESET
                                                                                  and "@" in name)]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}, each preset "
                                 "also as NAME@LEVELS (comma-separated; empty to skip the section)")
    for name in names:
        levels = name.partition("@")[2]
        if "@" in name and not (levels.isdigit() and 1 <= int(levels) <= 62):
            raise click.BadParameter(f"{name!r}: LEVELS must be a whole number in 1..62 (the memory's levels)")
    return names


def parse_distances(ctx, param, text: str) -> tuple[int, ...]:
    """Comma-separated key-to-query distances, 1 to 2**24 each, sorted."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = int(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a whole number") from None
        if not 1 <= value <= 1 << 24:
            raise click.BadParameter(f"{value} is out of range: a distance is 1 to 2**24 tokens")
        values.append(value)
    if not values:
        raise click.BadParameter("give at least one distance")
    return tuple(sorted(set(values)))


def parse_checkpoints(ctx, param, text: str) -> tuple[str, ...]:
    """Comma-separated checkpoint folders, each one that exists (a config.json inside)."""
    folders = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    missing = [f for f in folders if not (Path(f) / "config.json").is_file()]
    if missing:
        raise click.BadParameter(f"not a checkpoint folder (no config.json): {', '.join(missing)}")
    return folders


def parse_precisions(ctx, param, text: str) -> tuple[str, ...]:
    """Comma-separated precisions from PRECISIONS, each kept once, in the order they run; fp32 is
    always timed (the other precisions are compared with it)."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(PRECISIONS))
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(PRECISIONS)} "
                                 "(comma-separated)")
    return tuple(p for p in PRECISIONS if p in names | {"fp32"})


def parse_sections(ctx, param, text: str) -> tuple[str, ...]:
    """Comma-separated section names, each kept once, in the order the sections run."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(SECTIONS))
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(SECTIONS)} (comma-separated)")
    if not names:
        raise click.BadParameter(f"give at least one section: comma-separated names from {', '.join(SECTIONS)}")
    return tuple(name for name in SECTIONS if name in names)


def check_device(ctx, param, name: str) -> str:
    """A device this machine has (auto: picked when the train section runs)."""
    if name in ("auto", "cpu"):
        return name
    import torch

    if not (torch.cuda.is_available() if name == "cuda" else torch.backends.mps.is_available()):
        raise click.BadParameter(f"{name} is not available on this machine; use auto or cpu")
    return name


def cannot_create_in(directory: Path) -> str | None:
    """Why no file can be created in `directory` (None: one can). Tries it: permission bits do
    not tell (root, read-only mounts, /proc); the probe file is removed at once."""
    if not directory.is_dir():
        return f"{directory} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".lmn-bench{TEMP_MARK}probe-"):
            pass
    except OSError as e:
        return f"cannot create files in {directory} ({e.strerror or e})"
    return None


def check_json_path(ctx, param, path: Path | None) -> Path | None:
    """A file path the results can be written to when the run ends (checked now, not after minutes)."""
    if path is None:
        return None
    target = resolve_target(path)
    if target.is_dir():
        raise click.BadParameter(f"{path} is a folder; give a file path, e.g. {path / 'bench.json'}")
    if target.exists() and not target.is_file():
        raise click.BadParameter(f"{path} exists and is not a regular file; give a file path")
    if not target.parent.exists():
        raise click.BadParameter(f"folder {target.parent} does not exist; create it first")
    reason = cannot_create_in(target.parent)
    if reason:
        raise click.BadParameter(reason)
    return path


def check_plot_dir(ctx, param, path: Path | None) -> Path | None:
    """A folder the charts can go in (created before the run), with matplotlib importable."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise click.BadParameter(f"{path} exists and is not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    reason = cannot_create_in(existing)
    if reason:
        raise click.BadParameter(f"cannot write charts to {path}: {reason}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.BadParameter(MATPLOTLIB_HINT.removeprefix("--plot ")) from None
    return path


def quick_settings(s: Settings, given: set[str]) -> Settings:
    """--quick's small run; every option given on the command line keeps its value. Decode speed
    times the export being benchmarked (no preset exported) unless --speed-presets is given; the
    train section takes a few small steps (batch 4 x block 64, 2 rounds of 1 step)."""
    quick = {"contexts": (1024, 4096), "lmn_only_contexts": (16384,), "tokens": 50, "reps": 2}
    quick = {k: v for k, v in quick.items() if k not in given}
    presets = s.speed.presets if "speed_presets" in given else (EXPORT_PRESET,)
    train = {"batch": 4, "block": 64, "steps": 1}
    train = {k: v for k, v in train.items() if f"train_{k}" not in given}
    return dataclasses.replace(s, **quick, warmup=10, prompts=(64, 512), quality_chars=4096,
                               speed=dataclasses.replace(s.speed, presets=presets, tokens=100, rounds=2),
                               prefill=dataclasses.replace(s.prefill, history=600, turn=512, lengths=(1, 8, 32),
                                                           presets=(), reps=2),
                               train=dataclasses.replace(s.train, **train, rounds=2))


@click.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(min=1, max=1024), default=1, show_default=True,
              help="onnxruntime intra-op threads (and torch threads of the train section on the CPU).")
@click.option("--contexts", default="1024,4096,16384,65536", show_default=True, callback=parse_contexts,
              help="Shared contexts (comma-separated token counts).")
@click.option("--lmn-contexts", default="1048576", show_default=True, callback=parse_contexts,
              help="Extra LMN-only contexts (comma-separated; empty for none).")
@click.option("--tokens", type=click.IntRange(min=1, max=10**6), default=90, show_default=True, help="Timed tokens per repetition.")
@click.option("--reps", type=click.IntRange(min=1, max=10**4), default=10, show_default=True, help="Repetitions.")
@click.option("--step-all", is_flag=True, help="Reach LMN-only contexts by stepping too (1M tokens: minutes).")
@click.option("--speed-presets", default=",".join(SpeedSettings().presets), show_default=True, callback=parse_presets,
              help=f"Presets for the decode-speed section (comma-separated; '{EXPORT_PRESET}': the export benchmarked, "
                   "at its own size; empty to skip it).")
@click.option("--speed-precisions", default=",".join(DEFAULT_PRECISIONS), show_default=True,
              callback=parse_precisions,
              help=f"Precisions of the decode-speed section, comma-separated, from {', '.join(PRECISIONS)} (int8, int4: "
                   "weight-only; fp32 is always timed).")
@click.option("--sections", default=",".join(DEFAULT_SECTIONS), show_default=True, callback=parse_sections,
              help=f"Sections to run, comma-separated, from {', '.join(SECTIONS)} (train: training throughput of "
                   "LMN and GPT-2 presets, not run by default; it needs no export).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, callback=check_device,
              help="Device of the train section (auto: cuda, else mps, else cpu).")
@click.option("--train-batch", type=click.IntRange(min=1, max=4096), default=16, show_default=True, help="Train section: batch size.")
@click.option("--train-block", type=click.IntRange(min=2, max=1 << 16), default=512, show_default=True,
              help="Train section: tokens per sequence (a GPT-2 preset trains at most at its position table: GPT-2-128 at 256).")
@click.option("--train-steps", type=click.IntRange(min=1, max=10**4), default=3, show_default=True,
              help="Train section: timed steps per preset in each of 5 interleaved rounds.")
@click.option("--reach-checkpoints", default="", callback=parse_checkpoints,
              help="Reach section: checkpoint folders, comma-separated (default: the shipped LMN and GPT-2-32).")
@click.option("--reach-tokens", type=click.IntRange(min=2, max=1 << 24), default=65536, show_default=True,
              help="Reach section: val-split positions scored, from its start, as one stream.")
@click.option("--recall-checkpoints", default="", callback=parse_checkpoints,
              help="Recall section: checkpoint folders trained on the probe's text (python -m lmn_export.bench.recall).")
@click.option("--recall-distances", default=",".join(map(str, DISTANCES)), show_default=True, callback=parse_distances,
              help="Recall section: key-to-query distances, comma-separated.")
@click.option("--recall-probes", type=click.IntRange(min=1, max=10**4), default=100, show_default=True,
              help="Recall section: probe streams per distance.")
@click.option("--quick", is_flag=True, help="A smoke test in under a minute: small contexts, few tokens, short text, "
                                            "tiny training steps; options given explicitly keep their values.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, callback=check_json_path,
              help="Write results as JSON.")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path), default=None, callback=check_plot_dir,
              help="Write PNG charts here.")
@click.pass_context
def main(ctx, directory, threads, contexts, lmn_contexts, tokens, reps, step_all, speed_presets, speed_precisions,
         sections, device, train_batch, train_block, train_steps, reach_checkpoints, reach_tokens, recall_checkpoints,
         recall_distances, recall_probes, quick, json_path, plot_dir):
    """Benchmark an LMN export (default: the shipped one) against a same-size GPT-2 KV cache; with
    `--sections train`, the training throughput of LMN and GPT-2 presets of the same width."""
    if plot_dir and not {"decode", "recall"} & set(sections):
        raise click.BadParameter("the charts plot the decode and recall sections; add one to --sections",
                                 param_hint="'--plot'")
    if "recall" in sections and not recall_checkpoints:
        raise click.BadParameter("the recall section scores checkpoints trained on the probe's text; give them",
                                 param_hint="'--recall-checkpoints'")
    s = Settings(threads=threads, contexts=contexts, lmn_only_contexts=lmn_contexts, tokens=tokens, reps=reps,
                 step_all=step_all, speed=SpeedSettings(presets=speed_presets, precisions=speed_precisions),
                 sections=sections,
                 train=TrainSettings(batch=train_batch, block=train_block, steps=train_steps, device=device),
                 reach=ReachSettings(checkpoints=reach_checkpoints, tokens=reach_tokens),
                 recall=RecallSettings(checkpoints=recall_checkpoints, distances=recall_distances, probes=recall_probes))
    if quick:
        given = {name for name in ctx.params
                 if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
        s = quick_settings(s, {"lmn_only_contexts" if name == "lmn_contexts" else name for name in given})
    if plot_dir:
        try:
            plot_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise click.BadParameter(f"cannot create {plot_dir} ({e.strerror or e})", param_hint="'--plot'") from None
    try:
        result = run(directory, s, log=lambda m: click.echo(f"... {m}", err=True))
    except (runtime.ManifestError, runtime.BackendError) as e:
        raise click.ClickException(str(e)) from None
    except MemoryError:
        raise click.ClickException("out of memory: the GPT-2 KV cache grows with --contexts (and the LMN's state "
                                   "does not); give smaller --contexts") from None
    written = []
    try:
        if json_path:
            text, replaced = results_json(result)
            write_atomic(json_path, text)
            written.append(json_path)
            if replaced:
                click.echo(f"note: not finite, written to {json_path} as null: {', '.join(replaced)}", err=True)
        if plot_dir:
            written += plot(result, plot_dir)
    except OSError as e:
        print_report(result)
        raise click.ClickException(f"cannot write {e.filename or 'results'} ({e.strerror or e})") from None
    print_report(result)
    for path in written:
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
