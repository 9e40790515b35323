"""What one `lmn-bench` run measures: its sections and their sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

from .decode_speed import SpeedSettings
from .prefill import PrefillSettings
from .reach import ReachSettings
from .recall import RecallSettings

# Sections of a run, in the order they run: decode latency per context (LMN, GPT-2 KV caches, the
# memory-free LMN), time to first token, prefill vs stepping per width (break-even, second turn), decode
# speed per preset, held-out quality, footprint (files and resident memory against the weights), reach
# (loss by position), the recall probe, training throughput.
SECTIONS = ("decode", "ttft", "prefill", "speed", "quality", "footprint", "reach", "recall", "train")
NO_EXPORT_SECTIONS = ("reach", "recall", "train")  # PyTorch on checkpoints: asked for, never run by default
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name not in NO_EXPORT_SECTIONS)
DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_CONTEXT = 1 << 62  # the LMN's pointer is an int64


@dataclass
class TrainSettings:
    """The `train` section: forward + backward + AdamW steps on random tokens (the time of a step
    does not depend on the text), every preset of TRAIN_PAIRS built once, then timed round after
    round, the presets interleaved within each round."""

    batch: int = 16
    block: int = 512  # a GPT-2 preset trains at min(block, its position table): GPT-2-128 at 256
    steps: int = 3  # timed steps per preset per round
    rounds: int = 5
    device: str = "auto"  # cuda, else mps, else cpu


@dataclass
class Settings:
    threads: int = 1
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    lmn_only_contexts: tuple[int, ...] = (1 << 20,)
    tokens: int = 90  # per repetition: short repetitions, many of them, spread a slow phase of the machine
    reps: int = 10
    warmup: int = 30
    prompts: tuple[int, ...] = (64, 512, 4096)
    quality_chars: int | None = None
    step_all: bool = False
    seed: int = 0
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    prefill: PrefillSettings = field(default_factory=PrefillSettings)
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    train: TrainSettings = field(default_factory=TrainSettings)
    reach: ReachSettings = field(default_factory=ReachSettings)
    recall: RecallSettings = field(default_factory=RecallSettings)


def gpt_positions(s: Settings) -> int:
    """Rows the GPT-2 baseline must hold: a shared context plus every token stepped after it
    (warm-up and timed), or the longest time-to-first-token prompt, whichever is longer."""
    span = s.warmup + s.tokens * s.reps
    return max(max(s.contexts) + span, max(s.prompts, default=0)) + 1
