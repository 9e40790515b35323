"""lmn-verify: run an export folder's conformance vectors through this runtime (torch-free)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .backends import BackendError
from .conformance import ConformanceError, verify
from .manifest import ManifestError
from .model import BACKENDS, PRECISIONS


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--precision", "precisions", type=click.Choice(PRECISIONS), multiple=True,
              help="Check only these precisions (repeatable); default: every precision the vectors cover.")
@click.option("--threads", type=click.IntRange(min=1, max=1024), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def main(directory, backend, precisions, threads, as_json):
    """Check that this runtime reproduces DIRECTORY's conformance.json (the shipped export when omitted).

    Exits 1 when any case differs beyond its precision's tolerance, 2 when the folder cannot be checked.
    """
    from .model import DEFAULT_EXPORT

    directory = directory if directory is not None else DEFAULT_EXPORT
    try:
        results = verify(directory, backend, tuple(precisions) or None, threads)
    except (ManifestError, ConformanceError, BackendError) as e:
        cannot_check(str(e))
    if not results:
        cannot_check(f"no conformance case of {directory} applies to backend {backend}"
                     f"{' and precision ' + ','.join(precisions) if precisions else ''}")
    passed = all(r.passed for r in results)
    if as_json:
        click.echo(json.dumps({"directory": str(directory), "backend": backend, "passed": passed,
                               "cases": [r.to_dict() for r in results]}, indent=2))
    else:
        for r in results:
            gap = "non-finite" if r.max_logit_gap is None else f"{r.max_logit_gap:.2g}"
            click.echo(f"{'ok  ' if r.passed else 'FAIL'} {r.precision:<13} {r.name:<28} argmax agreement "
                       f"{r.argmax_agreement:.2%}{excused(r)}, max logit gap {gap}{', ' + r.detail if r.detail else ''}")
        click.echo(f"{sum(r.passed for r in results)} of {len(results)} cases passed ({directory}, {backend})")
    sys.exit(0 if passed else 1)


def excused(result) -> str:
    n = result.excused_flips
    return f" ({n} near-tie flip{'s' if n > 1 else ''} excused)" if n else ""


def cannot_check(message: str) -> None:
    """Exit 2 (not 1, which means a case failed): the folder could not be checked at all."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
