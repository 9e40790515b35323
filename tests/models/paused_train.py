"""`python tests/models/paused_train.py PHASE ARGS...`: lmn-train ARGS, stopped once at PHASE of a checkpoint write.

The pause lives here, not in the writer: this launcher wraps the calls that bound each phase in
models.checkpoint, announces the phase on stderr and sleeps, so a test can kill the process at that
exact point. Phases: "staged" (new files written, not committed: before the commit rename),
"committed" (commit folder in place, nothing moved: before roll_forward), "moving" (the weights moved
over the old ones, the rest not yet: after the first move).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models import checkpoint  # noqa: E402
from models.train import main  # noqa: E402

PAUSE_S = 120


def pause(phase: str) -> None:
    print(f"paused at {phase}", file=sys.stderr, flush=True)
    time.sleep(PAUSE_S)


class PausingOs:
    """models.checkpoint's `os`, pausing once at the commit rename ("staged") or after the first move ("moving")."""

    def __init__(self, phase: str):
        self.phase, self.done = phase, False

    def __getattr__(self, name):
        return getattr(os, name)

    def rename(self, src, dst):
        if self.phase == "staged" and not self.done and Path(dst).name == checkpoint.COMMIT:
            self.done = True
            pause("staged")
        os.rename(src, dst)

    def replace(self, src, dst):
        os.replace(src, dst)
        if self.phase == "moving" and not self.done:
            self.done = True
            pause("moving")


def install(phase: str) -> None:
    if phase not in ("staged", "committed", "moving"):
        sys.exit(f"unknown phase {phase!r}")
    checkpoint.os = PausingOs(phase)
    if phase == "committed":
        roll_forward, paused = checkpoint.roll_forward, []

        def pausing_roll_forward(directory):
            if not paused and (Path(directory) / checkpoint.COMMIT).is_dir():
                paused.append(True)
                pause("committed")
            roll_forward(directory)

        checkpoint.roll_forward = pausing_roll_forward


if __name__ == "__main__":
    install(sys.argv[1])
    main(sys.argv[2:], prog_name="lmn-train")
