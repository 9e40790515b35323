"""Per-token latencies: timing a step function and summarizing the samples."""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass

import numpy as np


def rss_bytes() -> int:
    """Current resident memory of this process (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if platform.system() == "Darwin" else peak * 1024


@dataclass
class Timing:
    """Per-token latencies (microseconds) over several repetitions."""

    samples: list[list[float]]

    def summary(self) -> dict:
        flat = np.concatenate([np.asarray(s) for s in self.samples])
        medians = [float(np.median(s)) for s in self.samples]
        return {"p50_us": float(np.percentile(flat, 50)), "p99_us": float(np.percentile(flat, 99)),
                "tokens_per_s": 1e6 / float(np.mean(flat)),
                "rep_median_us_min": min(medians), "rep_median_us_max": max(medians), "n_tokens": int(flat.size)}


def time_steps(step, tokens: list[int], reps: int, warmup: int) -> Timing:
    """Step `warmup` tokens untimed, then `reps` repetitions of the rest, each token timed alone."""
    for t in tokens[:warmup]:
        step(t)
    samples = []
    per_rep = (len(tokens) - warmup) // reps
    clock = time.perf_counter_ns
    for r in range(reps):
        lat = []
        for t in tokens[warmup + r * per_rep: warmup + (r + 1) * per_rep]:
            began = clock()
            step(t)
            lat.append((clock() - began) / 1e3)
        samples.append(lat)
    return Timing(samples)


def cycle(ids: list[int], n: int, offset: int = 0) -> list[int]:
    """`n` ids of `ids` from `offset`, wrapping around."""
    return [ids[(offset + i) % len(ids)] for i in range(n)]
