"""Decode latency per context (the LMN reached by stepping real text, GPT-2 by filling its cache)
and time to first token (the LMN's prefill graph against stepping, and GPT-2 stepping)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

import runtime

from .baselines import KVConcatStepper, KVRowsStepper, session
from .settings import Settings
from .timing import Timing, cycle, rss_bytes, time_steps


def bench_lmn(model: runtime.ExportedModel, drive: list[int], s: Settings, log) -> list[dict]:
    """Decode latency and memory of the LMN at each context, reached by stepping real text.

    Every context's stream is reached first; then repetitions alternate between them (each
    resuming its own state), so a slow phase of the machine hits every context alike.
    """
    stream = runtime.Stream(model)
    states, position, reached = {}, 0, {}
    for context in sorted(set(s.contexts) | set(s.lmn_only_contexts)):
        if s.step_all or context <= max(s.contexts):
            log(f"LMN: stepping to context {context:,}")
            stream.feed_ids(cycle(drive, context - position, position))
            reached[context] = "stepping"
        else:  # the step's work depends on the pointer (which levels re-summarize), not on the text
            log(f"LMN: context {context:,} by setting the pointer of the stepped state")
            stream.stepper.set_state({"pointer": np.array([context], dtype=np.int64)})
            reached[context] = f"pointer set (memory from stepping {position:,})"
        position = context
        states[context] = {k: v.copy() for k, v in stream.stepper.state.items()}
    log(f"LMN: timing {len(states)} contexts, repetitions interleaved")
    samples = {context: [] for context in states}
    for rep in range(s.reps):
        for context, state in states.items():
            stream.stepper.set_state(state)
            warmup = s.warmup if rep == 0 else 0
            tokens = cycle(drive, warmup + s.tokens, context + rep * s.tokens)
            samples[context] += time_steps(stream.stepper.step, tokens, 1, warmup).samples
            states[context] = {k: v.copy() for k, v in stream.stepper.state.items()}
    return [{"model": "lmn", "layout": "memory", "n_ctx": context, "reached_by": reached[context],
             "state_bytes": stream.state_bytes, "rss_bytes": rss_bytes(), **Timing(samples[context]).summary()}
            for context in states]


def bench_gpt(gpt_dir: Path, cfg: dict, contexts, s: Settings, log) -> list[dict]:
    rows = []
    rng = np.random.default_rng(s.seed)
    rows_session = session(gpt_dir / "kv_rows.onnx", s.threads)
    concat_session = session(gpt_dir / "kv_concat.onnx", s.threads)
    span = s.warmup + s.tokens * s.reps
    tokens = rng.integers(0, cfg["vocab_size"], span).tolist()
    for context in contexts:
        for layout, stepper in (("kv-inplace", KVRowsStepper(rows_session, cfg, context + span + 1)),
                                ("kv-concat", KVConcatStepper(concat_session, cfg))):
            log(f"GPT-2 ({layout}): context {context:,} (cache filled, not stepped)")
            stepper.fill(context, rng)
            timing = time_steps(stepper.step, tokens, s.reps, s.warmup)
            rows.append({"model": "gpt2", "layout": layout, "n_ctx": context, "reached_by": "cache fill",
                         "state_bytes": stepper.state_bytes, "rss_bytes": rss_bytes(), **timing.summary()})
            del stepper
    return rows



def bench_ttft(model: runtime.ExportedModel, gpt_dir: Path, gcfg: dict, drive: list[int], s: Settings) -> list[dict]:
    """Time to first token: LMN with the prefill graph vs stepping; GPT-2 stepping (in-place cache)."""
    rows = []
    gpt_session = session(gpt_dir / "kv_rows.onnx", s.threads)
    for n in s.prompts:
        prompt = cycle(drive, n, 1000)
        variants = {"lmn prefill": lambda: runtime.Stream(model).feed_ids(prompt),
                    "lmn stepping": lambda: [st.step(t) for st in [model.stepper()] for t in prompt],
                    "gpt2 stepping": lambda: [st.step(t) for st in [KVRowsStepper(gpt_session, gcfg, n + 1)] for t in prompt]}
        for name, run in variants.items():
            times = []
            for _ in range(3):
                began = time.perf_counter()
                run()
                times.append((time.perf_counter() - began) * 1e3)
            rows.append({"test": "ttft", "variant": name, "prompt_tokens": n, "ms_median": statistics.median(times),
                         "ms_min": min(times), "ms_max": max(times)})
    return rows


