"""The bandwidth floor of a decode step: the weight bytes a token reads, and how fast this machine
reads that many bytes, measured in the same run.

A step reads every weight of the graph it runs, so its time is at least weight bytes / read
bandwidth. The bandwidth is measured on a buffer the size of those weights, read over and over like
the weights are token after token, so it sits in the same level of the cache hierarchy (a few
hundred KB stay in L2; tens of MB stream from L3 or DRAM).

The read is `np.max` over the buffer as float32: one pass, SIMD, single-threaded, and no arithmetic
to speak of (on this project's machine it reads about as fast as a BLAS dot product, where `np.sum`,
a pairwise sum, is compute-bound at about two-thirds of that). Any real kernel does some work per byte, so the
measured rate is a lower bound of the hardware's; the floor it gives is the least time that kernel
needs. Every repetition plants a marker at a different place and checks that the read found it: a
read that skipped part of the buffer would fail instead of reporting a bandwidth it never achieved.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

READ_REPEATS = 30  # timed reads per measurement (best-of and median reported)
MIN_READ_BYTES = 4096


class ReadCheckError(RuntimeError):
    """The read kernel did not see every part of its buffer: its timing would not be a bandwidth."""


def initializer_bytes(path: Path) -> int:
    """Bytes of the constant tensors of an ONNX graph: its initializers and Constant nodes' values
    (a Gather reads one row of its table, so for an embedding this counts more than is read)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    total = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    total += numpy_helper.to_array(attribute.t).nbytes
    return total


def bytes_per_token(calls: Counter, directory: Path) -> float:
    """Weight bytes one token reads: each graph's constant bytes, weighted by how often it ran
    (`calls`: runs per graph file, as the runtime's stepper counts them)."""
    runs = sum(calls.values())
    if runs == 0:
        raise ValueError("no graph ran: nothing to weigh")
    return sum(n * initializer_bytes(directory / file) for file, n in calls.items()) / runs


def stream_read(buffer: np.ndarray) -> float:
    """One streaming read of every byte of a float32 buffer (its largest value)."""
    return float(buffer.max())


def read_bandwidth(n_bytes: float, repeats: int = READ_REPEATS, read=stream_read) -> dict:
    """Bytes per second at which one thread reads a buffer of `n_bytes` (at least MIN_READ_BYTES),
    best of `repeats` timed reads after one untimed one, and their median.

    Raises ReadCheckError if a read misses the marker planted for it (see the module docstring).
    """
    count = max(int(n_bytes), MIN_READ_BYTES) // 4
    buffer = np.zeros(count, np.float32)  # (count,) float32
    read(buffer)  # first touch: pages mapped, caches warm, as the weights are after the first token
    times = []
    for r in range(repeats):
        where = (2 * r + 1) * count // (2 * repeats)  # each repetition a different place, spread over the buffer
        buffer[where] = 1.0
        began = time.perf_counter_ns()
        found = read(buffer)
        times.append((time.perf_counter_ns() - began) / 1e9)
        buffer[where] = 0.0
        if found != 1.0:
            raise ReadCheckError(f"the read of {buffer.nbytes:,} bytes missed the marker at element {where:,}")
    best, median = min(times), float(np.median(times))
    return {"buffer_bytes": buffer.nbytes, "bytes_per_s": buffer.nbytes / best,
            "median_bytes_per_s": buffer.nbytes / median, "repeats": repeats}


def floor_fields(mean_us: float, weight_bytes: float, bandwidth: dict) -> dict:
    """The floor (us per token at the measured bandwidth) and the measured mean over it."""
    floor_us = weight_bytes / bandwidth["bytes_per_s"] * 1e6
    return {"weight_bytes": weight_bytes, "read_bytes_per_s": bandwidth["bytes_per_s"], "floor_us": floor_us,
            "vs_floor": mean_us / floor_us if floor_us > 0 else float("inf")}
