"""lmn-chat as a person uses it: a real terminal (pexpect), and the non-interactive forms."""

from __future__ import annotations

import subprocess
import sys

import pexpect
from click.testing import CliRunner

from runtime.chat import main

CHAT = [sys.executable, "-m", "runtime.chat"]


def spawn(export_dir, *args):
    child = pexpect.spawn(CHAT[0], [*CHAT[1:], str(export_dir), *args], encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    child.expect("lmn-chat:")
    child.expect_exact("> ")
    return child


def test_interactive_session(export_dir, tmp_path):
    child = spawn(export_dir, "--max-tokens", "1000000", "--stop", "", "--seed", "1")
    child.sendline("To be, or not to be")
    child.expect(r"[a-z ]{20}")  # characters are arriving while the reply is still being generated
    child.sendintr()  # Ctrl-C stops this reply, not the session
    child.expect_exact("[stopped]")
    child.expect_exact("> ")
    child.sendline("/stats")
    child.expect(r"tokens seen ([\d,]+) \| state ([\d,]+) bytes \| decode ([\d,]+) tokens/s")
    seen = int(child.match.group(1).replace(",", ""))
    assert seen > 20 + len("To be, or not to be\n")
    child.expect_exact("> ")
    state = tmp_path / "chat.state"
    child.sendline(f"/save {state}")
    child.expect_exact("[saved")
    child.expect_exact("> ")
    child.sendline("/reset")
    child.expect_exact("[state reset]")
    child.expect_exact("> ")
    child.sendline(f"/load {state}")
    child.expect(r"\[loaded .*: ([\d,]+) tokens of context\]")
    assert int(child.match.group(1).replace(",", "")) == seen
    child.expect_exact("> ")
    child.sendline("/temp 0")
    child.expect_exact("[temperature 0]")
    child.expect_exact("> ")
    child.sendline("/load /nonexistent/file")
    child.expect_exact("[error: no such file")
    child.expect_exact("> ")
    child.sendline("/help")
    child.expect_exact("Ctrl-D exits")
    child.expect_exact("> ")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_state_carries_across_turns(export_dir):
    child = spawn(export_dir, "--max-tokens", "5", "--stop", "", "--seed", "3")
    seen = []
    for text in ("To be", "or not"):
        child.sendline(text)
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"tokens seen (\d+)")
        seen.append(int(child.match.group(1)))
        child.expect_exact("> ")
    assert seen == [len("To be\n") + 5, len("To be\n") + 5 + len("or not\n") + 5]
    child.sendeof()
    child.expect(pexpect.EOF)


def test_prompt_flag_is_reproducible(export_dir):
    args = [str(export_dir), "--prompt", "To be, or not to be", "--max-tokens", "40", "--seed", "5", "--stop", ""]
    first = CliRunner().invoke(main, args)
    second = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output == second.output and len(first.output) == 41


def test_prompt_from_stdin_and_json(export_dir):
    done = subprocess.run([*CHAT, str(export_dir), "--max-tokens", "10", "--seed", "1", "--json", "--stop", ""],
                          input="To be, or not", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    data = json.loads(done.stdout)
    assert data["prompt"] == "To be, or not" and len(data["continuation"]) == 10
    assert data["tokens_seen"] == len("To be, or not") + 10


def test_errors_are_one_line(export_dir, tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path / "nowhere"), "--prompt", "x"])
    assert result.exit_code != 0 and "no export folder" in result.output
    result = CliRunner().invoke(main, [str(export_dir), "--prompt", "Zebra"])
    assert result.exit_code != 0 and "not in the model's vocabulary" in result.output
    assert "Traceback" not in result.output
