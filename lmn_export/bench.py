"""`lmn-bench`: LMN vs a same-size GPT-2 with a KV cache, decoding through onnxruntime on this CPU,
and (section `train`) training throughput of LMN and GPT-2 presets of the same width in PyTorch.

Everything is measured in one process, one run, side by side, so ratios are meaningful on a
noisy machine. Embedded-style defaults: one thread, one stream, warm-up excluded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from click.core import ParameterSource

import runtime
from runtime.atomic import TEMP_MARK, atomic_path, resolve_target, write_atomic
from runtime.backends import OnnxStepper
from runtime.model import open_session

from .decode_speed import EXPORT_PRESET, SpeedSettings, bench_decode_speed, preset_names

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
GPT_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "baselines" / "gpt2-32"
QUALITY_WINDOWS = ((0, 512), (512, 4096), (4096, 16384), (16384, 1 << 62))
MAX_CONTEXT = 1 << 62  # the LMN's pointer is an int64
# Sections of a run, in the order they run: decode latency per context (LMN, GPT-2 KV caches, the
# memory-free LMN), time to first token, decode speed per preset, held-out quality, training throughput.
SECTIONS = ("decode", "ttft", "speed", "quality", "train")
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name != "train")
DEVICES = ("auto", "cpu", "cuda", "mps")
TRAIN_PAIRS = (("logmem-32", "gpt2-32"), ("logmem-128", "gpt2-128"))  # (LMN, GPT-2) of the same width


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


class KVRowsStepper:
    """GPT decode with a preallocated cache updated in place: the strongest KV baseline here.

    Cache buffers are bound once (IO binding, shared with numpy); each step the graph returns only
    the new key/value rows, which are written into the cache at the pointer (no cache copy).
    """

    def __init__(self, session, cfg: dict, capacity: int):
        import onnxruntime as ort

        shape = (1, cfg["n_layer"], cfg["n_head"], capacity, cfg["n_embd"] // cfg["n_head"])
        self.keys = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.token = np.zeros(1, np.int64)
        self.pointer = np.zeros(1, np.int64)
        self.logits = np.zeros((1, cfg["vocab_size"]), np.float32)
        self.key_rows = np.zeros(shape[:3] + shape[4:], np.float32)
        self.value_rows = np.zeros_like(self.key_rows)
        value = ort.OrtValue.ortvalue_from_numpy
        self.binding = session.io_binding()
        for name, array in (("token", self.token), ("keys", self.keys), ("values", self.values), ("pointer", self.pointer)):
            self.binding.bind_ortvalue_input(name, value(array))
        for name, array in (("logits", self.logits), ("key_rows", self.key_rows), ("value_rows", self.value_rows)):
            self.binding.bind_ortvalue_output(name, value(array))
        self.session = session

    def fill(self, context: int, rng: np.random.Generator) -> None:
        """Reach a context by filling the cache with values (attention cost does not depend on them)."""
        self.keys[:, :, :, :context] = rng.standard_normal(self.keys[:, :, :, :context].shape, dtype=np.float32)
        self.values[:, :, :, :context] = rng.standard_normal(self.values[:, :, :, :context].shape, dtype=np.float32)
        self.pointer[0] = context

    def step(self, token: int) -> np.ndarray:
        self.token[0] = token
        self.session.run_with_iobinding(self.binding)
        p = int(self.pointer[0])
        self.keys[:, :, :, p] = self.key_rows
        self.values[:, :, :, p] = self.value_rows
        self.pointer[0] = p + 1
        return self.logits[0]

    @property
    def state_bytes(self) -> int:
        return 2 * self.key_rows.nbytes * int(self.pointer[0]) + 8


class KVConcatStepper:
    """GPT decode with the concat layout common exporters produce: present = concat(past, new)."""

    def __init__(self, session, cfg: dict):
        self.session, self.cfg = session, cfg

    def fill(self, context: int, rng: np.random.Generator) -> None:
        c = self.cfg
        shape = (1, c["n_layer"], c["n_head"], context, c["n_embd"] // c["n_head"])
        self.past = [rng.standard_normal(shape, dtype=np.float32) for _ in range(2)]

    def step(self, token: int) -> np.ndarray:
        logits, k, v = self.session.run(None, {"token": np.array([token], np.int64),
                                               "past_keys": self.past[0], "past_values": self.past[1]})
        self.past = [k, v]
        return logits[0]

    @property
    def state_bytes(self) -> int:
        return self.past[0].nbytes * 2


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
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    train: TrainSettings = field(default_factory=TrainSettings)


session = open_session


def gpt_positions(s: Settings) -> int:
    """Rows the GPT-2 baseline must hold: a shared context plus every token stepped after it
    (warm-up and timed), or the longest time-to-first-token prompt, whichever is longer."""
    span = s.warmup + s.tokens * s.reps
    return max(max(s.contexts) + span, max(s.prompts, default=0)) + 1


def text_ids(vocab: runtime.Vocab, chars: int | None) -> tuple[list[int], list[int], str]:
    """(train-side ids for driving decode, val-split ids for quality, source) of the reference corpus."""
    if CORPUS.is_file():
        text = CORPUS.read_text(encoding="utf-8")
        split = int(len(text) * 0.9)
        val = text[split:][:chars] if chars else text[split:]
        try:
            return vocab.encode(text[:split]), vocab.encode(val), f"Tiny Shakespeare ({CORPUS.name}), val = last 10%"
        except runtime.UnknownCharacterError:
            reason = "the model's vocabulary does not cover the corpus"
    else:
        reason = f"corpus not found at {CORPUS}"
    ids = np.random.default_rng(0).integers(0, len(vocab), 200_000).tolist()
    return ids, [], f"random token ids ({reason}: quality skipped)"


def cycle(ids: list[int], n: int, offset: int = 0) -> list[int]:
    return [ids[(offset + i) % len(ids)] for i in range(n)]


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


def build_baselines(lmn_config: dict, max_context: int, work: Path, log) -> tuple[Path, dict, tuple[Path, dict]]:
    """Random-weight graphs for timing: a same-width GPT-2 with a cache of max_context rows (rows and
    concat layouts), and the same LMN with its memory removed (max_levels 1: attention over the token alone)."""
    import torch

    from models import GPT, LMN, GPTConfig, LMNConfig
    from . import onnx_export

    torch.manual_seed(0)
    keys = ("vocab_size", "n_embd", "n_head", "n_layer")
    gcfg = GPTConfig(**{k: lmn_config[k] for k in keys}, block_size=max_context)
    log(f"building GPT-2 timing graphs (cache {max_context:,} rows)")
    gpt = GPT(gcfg).eval()
    gpt_dir = work / "gpt"
    gpt_dir.mkdir()
    onnx_export.export_kv_layout(gpt, gpt_dir / "kv_rows.onnx", "rows")
    onnx_export.export_kv_layout(gpt, gpt_dir / "kv_concat.onnx", "concat")
    log("building the memory-free LMN graph")
    fields = {f.name for f in dataclasses.fields(LMNConfig)}
    bare = LMN(LMNConfig(**{**{k: v for k, v in lmn_config.items() if k in fields}, "max_levels": 1})).eval()
    bare_path = work / "lmn_no_memory.onnx"
    bare_graph = onnx_export.export_step(bare, bare_path).to_dict()
    return gpt_dir, gcfg.to_dict(), (bare_path, bare_graph)


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


def nll(logits: np.ndarray, target: int) -> float:
    z = logits.astype(np.float64)
    m = z.max()
    return float(m + np.log(np.exp(z - m).sum()) - z[target])


def bench_quality(model: runtime.ExportedModel, gpt: runtime.ExportedModel | None, val: list[int], log) -> list[dict]:
    """Held-out bits per character on the val split: the LMN as one stream (contexts far beyond its
    512-token training block); GPT-2 in independent 512-token windows (its position table's limit)."""
    if len(val) < 2:
        return []
    log(f"quality: LMN over {len(val):,} val characters as one stream")
    stream = runtime.Stream(model)
    losses = np.zeros(len(val) - 1)
    for i in range(len(val) - 1):
        stream.feed_ids([val[i]])
        losses[i] = nll(stream.logits, val[i + 1])
    rows = []
    for lo, hi in QUALITY_WINDOWS:
        part = losses[lo:hi]
        if part.size:
            rows.append({"test": "quality", "model": "lmn", "context": f"{lo + 1}-{min(hi, len(val) - 1)}",
                         "bpc": float(part.mean() / np.log(2)), "tokens": int(part.size)})
    rows.append({"test": "quality", "model": "lmn", "context": "all", "bpc": float(losses.mean() / np.log(2)),
                 "tokens": int(losses.size)})
    if gpt is not None:
        block = gpt.config["block_size"]
        log(f"quality: GPT-2 over the same text in {block}-token windows")
        glosses = []
        for start in range(0, len(val) - 1, block):
            s = runtime.Stream(gpt)
            for i in range(start, min(start + block, len(val) - 1)):
                s.feed_ids([val[i]])
                glosses.append(nll(s.logits, val[i + 1]))
        rows.append({"test": "quality", "model": "gpt2", "context": f"1-{block} (windows)",
                     "bpc": float(np.mean(glosses) / np.log(2)), "tokens": len(glosses)})
    return rows


def train_device(name: str) -> str:
    """`--device`: the name itself, or for `auto` the first of cuda, mps, cpu that this machine has."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def train_block(cfg, block: int) -> int:
    """The block a preset trains at: `block`, or a GPT-2's position table if that is shorter."""
    return min(block, cfg.block_size) if hasattr(cfg, "block_size") else block


def bench_train(t: TrainSettings, threads: int, seed: int, log) -> list[dict]:
    """Training throughput, tokens per second (forward, cross-entropy, backward, AdamW step), of each
    preset in TRAIN_PAIRS: the median over `t.rounds` rounds of `t.steps` steps each, after one
    warm-up step, the presets interleaved in every round. fp32, `threads` torch threads on the CPU."""
    import torch
    import torch.nn.functional as F

    from models import build_model
    from models.config import preset

    device = train_device(t.device)
    sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}.get(device, lambda: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps, blocks = {}, {}
        for name in (name for pair in TRAIN_PAIRS for name in pair):
            torch.manual_seed(seed)
            cfg = preset(name)
            blocks[name] = block = train_block(cfg, t.block)
            model = build_model(cfg).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            tokens = torch.randint(cfg.vocab_size, (t.batch, block + 1), generator=torch.Generator().manual_seed(seed))
            inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

            def step(model=model, optimizer=optimizer, inputs=inputs, targets=targets):
                loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            log(f"train: {name} on {device}, batch {t.batch} x block {block}: warm-up step")
            step()
            steps[name] = step
        sync()
        rates = {name: [] for name in steps}
        for r in range(t.rounds):
            log(f"train: round {r + 1} of {t.rounds} ({t.steps} steps per preset)")
            for name, step in steps.items():
                began = time.perf_counter()
                for _ in range(t.steps):
                    step()
                sync()
                rates[name].append(t.batch * blocks[name] * t.steps / (time.perf_counter() - began))
    finally:
        torch.set_num_threads(previous)
    return [{"preset": name, "device": device, "precision": "fp32", "batch": t.batch, "block": blocks[name],
             "tokens_per_s": statistics.median(rates[name]), "round_tokens_per_s": rates[name],
             "threads": threads if device == "cpu" else None} for name in steps]


def train_ratios(rows: list[dict]) -> dict[str, float]:
    """{width: LMN tokens/s / GPT-2 tokens/s} for each pair in TRAIN_PAIRS."""
    from models.config import preset

    rate = {row["preset"]: row["tokens_per_s"] for row in rows}
    return {str(preset(lmn).n_embd): rate[lmn] / rate[gpt] for lmn, gpt in TRAIN_PAIRS if lmn in rate and gpt in rate}


def machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": ort.__version__}


def run(lmn_dir: Path | None, s: Settings, log=print) -> dict:
    """Every section in `s.sections`; the export is loaded only for the sections that time it."""
    result = {"machine": machine(), "settings": dataclasses.asdict(s)}
    if set(s.sections) - {"train"}:
        run_export_sections(lmn_dir, s, result, log)
    if "train" in s.sections:
        log("training throughput")
        result["train"] = bench_train(s.train, s.threads, s.seed, log)
    result["summary"] = summarize(result)
    return result


def run_export_sections(lmn_dir: Path | None, s: Settings, result: dict, log) -> None:
    """The sections that time an LMN export (decode, ttft, speed, quality), into `result`."""
    sections = set(s.sections)
    model = runtime.load(lmn_dir, threads=s.threads)
    if model.config.get("arch", "lmn") != "lmn":
        raise runtime.ManifestError(f"{model.directory} holds a {model.config['arch']} export; lmn-bench times an LMN "
                                    "export against its own GPT-2 baseline: give an LMN export folder")
    drive, val, source = text_ids(model.vocab, s.quality_chars)
    span = s.warmup + s.tokens * s.reps
    result.update({"text": source, "lmn": {"config": model.config, "state_bytes": model.state_bytes,
                                           "files": model.manifest.data["files"]}})
    if sections & {"decode", "ttft"}:
        with tempfile.TemporaryDirectory() as tmp:
            gpt_dir, gcfg, (bare_path, bare_graph) = build_baselines(model.config, gpt_positions(s), Path(tmp), log)
            if "decode" in sections:
                decode = bench_lmn(model, drive, s, log)
                decode += bench_gpt(gpt_dir, gcfg, s.contexts, s, log)
                bare = OnnxStepper(session(bare_path, s.threads), bare_graph)
                log("LMN without memory: timing")
                bare_timing = time_steps(bare.step, cycle(drive, span), s.reps, s.warmup).summary()
                result["decode"] = decode
                result["no_memory"] = bare_timing
                lmn_1k = next(r for r in decode if r["model"] == "lmn")
                result["memory_overhead_ratio"] = lmn_1k["p50_us"] / bare_timing["p50_us"]
            if "ttft" in sections:
                log("time to first token")
                result["ttft"] = bench_ttft(model, gpt_dir, gcfg, drive, s)
    if "speed" in sections and s.speed.presets:
        with tempfile.TemporaryDirectory() as tmp:
            result["decode_speed"] = bench_decode_speed(model.directory, drive, dataclasses.replace(s.speed, threads=s.threads),
                                                        Path(tmp), log)
        shipped = next((row for row in result["decode_speed"] if row["weights"] == "shipped"), None)
        if shipped and "decode" in sections:  # interleaved with the memory-free model, so robust to the machine's slow phases
            result["memory_overhead_ratio_sequential"] = result["memory_overhead_ratio"]
            result["memory_overhead_ratio"] = shipped["ratio_p50_vs_no_memory"]
    if "quality" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            gpt = trained_gpt_export(Path(tmp), log) if GPT_CHECKPOINT.is_dir() and val else None
            result["quality"] = bench_quality(model, gpt, val, log)


def trained_gpt_export(work: Path, log) -> runtime.ExportedModel:
    """The shipped, trained GPT-2-32 baseline, exported (full-cache step) for the quality test."""
    from .export import ExportOptions, export

    log("exporting the trained GPT-2-32 baseline for the quality test")
    export(GPT_CHECKPOINT, work / "gpt2-32", ExportOptions(prefill_sizes=(), parity_tokens=64))
    return runtime.load(work / "gpt2-32")


def summarize(r: dict) -> dict:
    """The headline numbers of the sections that ran."""
    out = {}
    decode = r.get("decode", [])
    lmn = {row["n_ctx"]: row for row in decode if row["model"] == "lmn"}
    inplace = {row["n_ctx"]: row for row in decode if row["layout"] == "kv-inplace"}
    concat = {row["n_ctx"]: row for row in decode if row["layout"] == "kv-concat"}
    if lmn:
        first, last = min(lmn), max(lmn)
        out = {"lmn_tps_ratio_longest_vs_first": lmn[last]["tokens_per_s"] / lmn[first]["tokens_per_s"],
               "lmn_contexts": [first, last],
               "lmn_state_bytes_constant": len({row["state_bytes"] for row in lmn.values()}) == 1,
               "memory_overhead_ratio": r["memory_overhead_ratio"]}
    for row in r.get("decode_speed", []):
        v = row["variants"]
        out[row["preset"]] = {name: round(t["p50_us"], 1) for name, t in v.items()} | {
            "ratio_p50_vs_no_memory": round(row["ratio_p50_vs_no_memory"], 2),
            "ratio_mean_vs_no_memory": round(row["ratio_mean_vs_no_memory"], 2)}
    common = max(set(lmn) & set(inplace)) if set(lmn) & set(inplace) else None
    if common:
        out["at_context"] = common
        out["speedup_vs_kv_inplace"] = inplace[common]["p50_us"] / lmn[common]["p50_us"]
        out["speedup_vs_kv_concat"] = concat[common]["p50_us"] / lmn[common]["p50_us"]
        out["state_ratio_vs_kv"] = inplace[common]["state_bytes"] / lmn[common]["state_bytes"]
    if r.get("train"):
        out["train_ratio"] = train_ratios(r["train"])
    return out


def print_report(r: dict) -> None:
    m = r["machine"]
    click.echo(f"\nmachine: {m['cpu']} ({m['cores']} cores), {m['os']}; numpy {m['numpy']}, onnxruntime {m['onnxruntime']}")
    if "decode" in r:
        print_decode(r)
    for row in r.get("decode_speed", []):
        click.echo(f"\ndecode speed, {row['preset']} ({row['weights']} weights), us per token:")
        click.echo(f"  {'variant':<17} {'p50':>8} {'mean':>8} {'p99':>8}  per-round p50")
        for name, t in row["variants"].items():
            rounds = " ".join(f"{x:.0f}" for x in t["round_p50_us"])
            click.echo(f"  {name:<17} {t['p50_us']:>8.1f} {t['mean_us']:>8.1f} {t['p99_us']:>8.1f}  {rounds}")
        py = row["python"]
        click.echo(f"  vs no memory: p50 {row['ratio_p50_vs_no_memory']:.2f}x, mean {row['ratio_mean_vs_no_memory']:.2f}x; "
                   f"runtime stepper overhead {py['overhead_us']:.1f} us/token (bare run {py['bare_run_us']:.1f} us)")
        prof = row.get("profile_levels_0")
        if prof:
            top = ", ".join(f"{o['op']} {o['share']:.0%} ({o['nodes']})" for o in prof["ops"][:8])
            click.echo(f"  profile, 0-level fast path ({prof['nodes_per_run']:.0f} nodes): {top}")
    if "ttft" in r:
        click.echo("\ntime to first token (ms, median of 3):")
        for row in r["ttft"]:
            click.echo(f"  {row['variant']:<14} {row['prompt_tokens']:>5} tokens: {row['ms_median']:9.2f}")
    if "lmn" in r:
        files = r["lmn"]["files"]
        click.echo("\nmodel files: " + ", ".join(f"{k} {v['bytes'] / 1024:.0f} KB" for k, v in files.items() if k.startswith("model.")))
    if r.get("quality"):
        click.echo("\nheld-out bits per character (val split):")
        for row in r["quality"]:
            click.echo(f"  {row['model']:<5} positions {row['context']:<18} {row['bpc']:.4f} bpc over {row['tokens']:,} chars")
    if "train" in r:
        print_train(r)
    click.echo("\nsummary: " + json.dumps(r["summary"], indent=None))


def print_decode(r: dict) -> None:
    click.echo(f"threads {r['settings']['threads']}, batch 1, {r['settings']['tokens']} tokens x {r['settings']['reps']} reps "
               f"after {r['settings']['warmup']} warm-up; text: {r['text']}\n")
    click.echo(f"{'model':<6} {'layout':<11} {'context':>9} {'p50 us':>9} {'p99 us':>9} {'tok/s':>9} "
               f"{'state bytes':>13} {'RSS MB':>8}  reached by")
    for row in r["decode"]:
        click.echo(f"{row['model']:<6} {row['layout']:<11} {row['n_ctx']:>9,} {row['p50_us']:>9.1f} {row['p99_us']:>9.1f} "
                   f"{row['tokens_per_s']:>9,.0f} {row['state_bytes']:>13,} {row['rss_bytes'] / 2**20:>8.1f}  {row['reached_by']}")
    nm = r["no_memory"]
    sequential = r.get("memory_overhead_ratio_sequential", r["memory_overhead_ratio"])
    click.echo(f"\nLMN without memory (same model and code, max_levels 1): p50 {nm['p50_us']:.1f} us; memory overhead "
               f"{sequential:.2f}x vs the LMN at the first context, timed apart (interleaved figure: decode speed below)")


def print_train(r: dict) -> None:
    t, rows = r["settings"]["train"], r["train"]
    device = rows[0]["device"] if rows else t["device"]
    threads = f", {r['settings']['threads']} torch thread(s)" if device == "cpu" else ""
    click.echo(f"\ntraining throughput (forward + backward + AdamW step, fp32, {device}{threads}; batch {t['batch']}; "
               f"tokens/s, median of {t['rounds']} interleaved rounds of {t['steps']} steps):")
    ratios = r["summary"].get("train_ratio", {})
    from models.config import preset

    for row in rows:
        cfg = preset(row["preset"])
        note = " (its position table)" if row["block"] < t["block"] else ""
        line = f"  {row['preset']:<11} block {row['block']:>5}{note:<21} {row['tokens_per_s']:>10,.0f} tokens/s"
        if row["preset"].startswith("gpt2") and str(cfg.n_embd) in ratios:
            line += f"   LMN / GPT-2 at width {cfg.n_embd}: {ratios[str(cfg.n_embd)]:.2f}"
        click.echo(line)


def finite_json(value, where: str = "") -> tuple[object, list[str]]:
    """`value` as standard JSON data: every NaN or infinite number becomes None (JSON null).

    Returns (the copy, where each replaced number was, e.g. "quality[0].bpc"): strict JSON readers
    reject NaN, and a null plus its place in the list says "not measured" without a fake number.
    """
    if isinstance(value, dict):
        pairs = [(k, finite_json(v, f"{where}.{k}" if where else str(k))) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, bad) in pairs for p in bad]
    if isinstance(value, (list, tuple)):
        items = [finite_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [p for _, bad in items for p in bad]
    if isinstance(value, (bool, np.bool_)):
        return bool(value), []
    if isinstance(value, (int, np.integer)):
        return int(value), []
    if isinstance(value, (float, np.floating)):
        return (float(value), []) if math.isfinite(value) else (None, [where])
    return value, []


def results_json(r: dict) -> tuple[str, list[str]]:
    """The results file's text (standard JSON: non-finite numbers are null, their places listed
    under `non_finite`) and that list."""
    clean, replaced = finite_json(r)
    clean["non_finite"] = replaced
    return json.dumps(clean, indent=2, allow_nan=False) + "\n", replaced


def plot(r: dict, directory: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException(MATPLOTLIB_HINT) from None
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, name in (("p50_us", "decode latency p50 (us/token)", "latency.png"),
                             ("state_bytes", "state bytes per stream", "state.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for series in sorted({(row["model"], row["layout"]) for row in r["decode"]}):
            pts = [(row["n_ctx"], row[key]) for row in r["decode"] if (row["model"], row["layout"]) == series]
            ax.plot(*zip(*pts), marker="o", label=" ".join(series))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(directory / name) as tmp:  # the temp name has no .png suffix: say the format
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append(directory / name)
    return written


# --- command-line arguments, each checked once where it enters (click callbacks), before any work ---

MATPLOTLIB_HINT = "--plot needs matplotlib: pip install 'lmn[bench]'"


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
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)} "
                                 "(comma-separated; empty to skip the section)")
    return names


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
                               train=dataclasses.replace(s.train, **train, rounds=2))


@click.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime intra-op threads (and torch threads of the train section on the CPU).")
@click.option("--contexts", default="1024,4096,16384,65536", show_default=True, callback=parse_contexts,
              help="Shared contexts (comma-separated token counts).")
@click.option("--lmn-contexts", default="1048576", show_default=True, callback=parse_contexts,
              help="Extra LMN-only contexts (comma-separated; empty for none).")
@click.option("--tokens", type=click.IntRange(min=1), default=90, show_default=True, help="Timed tokens per repetition.")
@click.option("--reps", type=click.IntRange(min=1), default=10, show_default=True, help="Repetitions.")
@click.option("--step-all", is_flag=True, help="Reach LMN-only contexts by stepping too (1M tokens: minutes).")
@click.option("--speed-presets", default="logmem-32,logmem-128", show_default=True, callback=parse_presets,
              help=f"Presets for the decode-speed section (comma-separated; '{EXPORT_PRESET}': the export benchmarked, "
                   "at its own size; empty to skip it).")
@click.option("--sections", default=",".join(DEFAULT_SECTIONS), show_default=True, callback=parse_sections,
              help=f"Sections to run, comma-separated, from {', '.join(SECTIONS)} (train: training throughput of "
                   "LMN and GPT-2 presets, not run by default; it needs no export).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, callback=check_device,
              help="Device of the train section (auto: cuda, else mps, else cpu).")
@click.option("--train-batch", type=click.IntRange(min=1), default=16, show_default=True, help="Train section: batch size.")
@click.option("--train-block", type=click.IntRange(min=2), default=512, show_default=True,
              help="Train section: tokens per sequence (a GPT-2 preset trains at most at its position table: GPT-2-128 at 256).")
@click.option("--train-steps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Train section: timed steps per preset in each of 5 interleaved rounds.")
@click.option("--quick", is_flag=True, help="A smoke test in under a minute: small contexts, few tokens, short text, "
                                            "tiny training steps; options given explicitly keep their values.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, callback=check_json_path,
              help="Write results as JSON.")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path), default=None, callback=check_plot_dir,
              help="Write PNG charts here.")
@click.pass_context
def main(ctx, directory, threads, contexts, lmn_contexts, tokens, reps, step_all, speed_presets, sections, device,
         train_batch, train_block, train_steps, quick, json_path, plot_dir):
    """Benchmark an LMN export (default: the shipped one) against a same-size GPT-2 KV cache; with
    `--sections train`, the training throughput of LMN and GPT-2 presets of the same width."""
    if plot_dir and "decode" not in sections:
        raise click.BadParameter("the charts plot the decode section; add decode to --sections", param_hint="'--plot'")
    s = Settings(threads=threads, contexts=contexts, lmn_only_contexts=lmn_contexts, tokens=tokens, reps=reps,
                 step_all=step_all, speed=SpeedSettings(presets=speed_presets), sections=sections,
                 train=TrainSettings(batch=train_batch, block=train_block, steps=train_steps, device=device))
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
