"""Every command's numeric options have bounds: an absurd value is a one-line usage error before any work."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lmn_export.bench.command import main as bench
from lmn_export.cli import main as export
from runtime.chat import main as chat
from runtime.verify import main as verify

HUGE = str(2**63)


@pytest.mark.parametrize("command, args", [
    (chat, ["--max-tokens", HUGE]), (chat, ["--top-k", "0"]), (chat, ["--top-k", HUGE]), (chat, ["--threads", HUGE]),
    (chat, ["--seed", str(2**64)]),
    (verify, ["runtime/default", "--threads", HUGE]),
    (export, ["--out", "never", "--fast-paths", HUGE]), (export, ["--out", "never", "--parity-tokens", HUGE]),
    (bench, ["--threads", HUGE]), (bench, ["--tokens", HUGE]), (bench, ["--reps", HUGE]),
    (bench, ["--train-batch", HUGE]), (bench, ["--train-block", HUGE]), (bench, ["--train-steps", HUGE]),
    (bench, ["--reach-tokens", HUGE]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_absurd_numbers_are_usage_errors(tmp_path, command, args):
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2, result.output  # click's usage error: nothing ran
    assert "Traceback" not in result.output and "Invalid value" in result.output
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("sizes, message", [("0", "1..65,536"), (str(1 << 17), "1..65,536"), ("x", "comma-separated")])
def test_prefill_sizes_are_checked_before_any_work(tmp_path, sizes, message):
    result = CliRunner().invoke(export, ["--out", str(tmp_path / "never"), "--prefill", sizes])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "never").exists()
