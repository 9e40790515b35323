"""`lmn-export`: a checkpoint to a validated export folder (ONNX and/or Core ML)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

import click

from models.checkpoint import CheckpointError
from models.data import DataError
from .export import DEFAULT_FAST_PATHS, DEFAULT_PREFILL_SIZES, MAX_PARITY_TOKENS, ExportOptions, export
from .onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportError
from .quantize import QUANTIZE_CHOICES
from .quantize_graph import DEFAULT_QUANT_BLOCK
from .validate import ValidationError


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter("give comma-separated token counts, e.g. 64,512,4096") from None
    return sizes  # their range is checked once, by the export (check_options)


def _names(text: str) -> tuple[str, ...]:
    """`int4,int8` -> ("int4", "int8"); the names are checked once, by the export (check_options)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(["onnx", "coreml", "all"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Export folder to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Core ML compute precision (fp16 for the Neural Engine).")
@click.option("--quantize", default="", metavar="NAMES",
              help=f"Also write quantized graphs, comma-separated: {', '.join(QUANTIZE_CHOICES)} (int4/int8: "
                   "weight-only, ONNX and Core ML; dynamic-int8: ONNX only).")
@click.option("--quant-block", type=int, default=DEFAULT_QUANT_BLOCK, show_default=True,
              help="Weights per int4/int8 quantization block: 16, 32, 64, 128 or 256 (what onnxruntime runs).")
@click.option("--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=DEFAULT_OPSET, show_default=True)
@click.option("--stateful", is_flag=True, help="Also write an iOS 18 Core ML variant with fp16 StateType memory.")
@click.option("--coreml-target", type=click.Choice(["iOS18", "iOS16"]), default="iOS18", show_default=True,
              help="iOS18: the Core ML step and prefill graphs as functions of one package (weights stored once); "
                   "iOS16: a package per graph, for older devices.")
@click.option("--atol", type=float, default=None, help="Parity tolerance (default 1e-4 fp32, 0.1 fp16).")
@click.option("--prefill", "prefill", default=",".join(map(str, DEFAULT_PREFILL_SIZES)), show_default=True,
              help="Prefill graph sizes in tokens (empty for none).")
@click.option("--fast-paths", type=click.IntRange(min=0, max=61), default=DEFAULT_FAST_PATHS, show_default=True,
              help="LMN step graphs for tokens that re-summarize exactly 0..N-1 levels (0: none).")
@click.option("--parity-tokens", type=click.IntRange(min=1, max=MAX_PARITY_TOKENS), default=512, show_default=True, help="Tokens streamed per parity check.")
@click.option("--text", type=str, default=None, help="Parity text file or URL (default: a built-in Hamlet sample).")
@click.option("--force", is_flag=True, help="Replace an earlier export in --out (one holding only the files its lmn.json lists).")
@click.option("--other-cpus/--no-other-cpus", default=True, show_default=True,
              help="Also run the conformance vectors under qemu-x86_64 -cpu Haswell (x86 without VNNI) when qemu is installed.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def main(checkpoint, target, out, precision, quantize, quant_block, opset, stateful, coreml_target, atol, prefill,
         fast_paths, parity_tokens, text, force, other_cpus, as_json):
    """Export CHECKPOINT (default: the shipped model) as a stateful single-step graph, with parity."""
    targets = ("onnx", "coreml") if target == "all" else (target,)
    options = ExportOptions(targets=targets, precision=precision, quantize=_names(quantize), quant_block=quant_block,
                            opset=opset, stateful=stateful, coreml_target=coreml_target, atol=atol, prefill_sizes=_sizes(prefill),
                            fast_paths=fast_paths, parity_tokens=parity_tokens, text=text, force=force,
                            other_cpus=other_cpus)
    say = (lambda m: click.echo(m, err=True)) if not as_json else (lambda m: None)
    try:
        with stop_on_signals():
            result = export(checkpoint, out, options, progress=lambda m: say(f"... {m}"))
    except (ExportError, ValidationError, CheckpointError, DataError) as e:
        raise click.ClickException(str(e)) from None
    manifest = result.manifest
    if as_json:
        click.echo(json.dumps({"directory": str(result.directory), "passed": result.passed, **manifest}, indent=2))
    else:
        print_summary(result)
    if not result.passed:
        click.echo(f"parity FAILED: nothing was written to {out}", err=True)
        sys.exit(1)


@contextlib.contextmanager
def stop_on_signals():
    """While inside, SIGTERM and SIGHUP end the export like Ctrl-C: its staging folder is removed."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def print_summary(result) -> None:
    m = result.manifest
    where = result.directory if result.passed else "nowhere (parity failed)"
    click.echo(f"exported {m['model']['arch']} ({m['model']['n_embd']}-wide, {m['model']['n_layer']} layers, "
               f"vocab {m['model']['vocab_size']}) to {where}")
    for name, facts in m["files"].items():
        click.echo(f"  {name:<32} {_human(facts['bytes']):>10}")
    span = ("constant, any length" if m["model"]["arch"] == "lmn"
            else f"a KV cache for at most {m['model']['block_size']} tokens")
    click.echo(f"  state per stream: {m['state']['bytes_per_stream']:,} bytes ({span})")
    click.echo(f"parity vs PyTorch ({m['parity']['text']}):")
    for r in result.reports:
        status = "ok  " if r.passed else "FAIL"
        gaps = ", ".join(f"{o.name} {o.max_abs_diff:.2g} (<= {o.atol:g})" for o in r.outputs)
        click.echo(f"  {status} {r.graph:<30} {r.tokens} tokens x {r.batch} rows via {r.runner}: {gaps}")
    for cpu in m.get("conformance", {}).get("other_cpus", []):  # lmn_export.cpu_check
        done = f"{cpu['cases']} cases passed" if cpu.get("passed") else f"not checked: {cpu.get('skipped')}"
        click.echo(f"conformance vectors on {cpu['cpu']}: {done}")


if __name__ == "__main__":
    main()
