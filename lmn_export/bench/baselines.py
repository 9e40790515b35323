"""The graphs the LMN is timed against: a same-width GPT-2 decoding with an explicit KV cache (two
layouts), and the same LMN with its memory removed. Random weights: timing does not depend on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.model import open_session

from .decode_speed import export_no_memory

session = open_session


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


def build_baselines(lmn_config: dict, max_context: int, work: Path, log) -> tuple[Path, dict, Path]:
    """Random-weight graphs for timing: a same-width GPT-2 with a cache of max_context rows (rows and
    concat layouts), and the export folder of the same LMN with its memory removed (max_levels 1:
    attention over the token alone; `decode_speed.export_no_memory`, fp32)."""
    import torch

    from models import GPT, GPTConfig

    from .. import onnx_export

    torch.manual_seed(0)
    keys = ("vocab_size", "n_embd", "n_head", "n_layer")
    gcfg = GPTConfig(**{k: lmn_config[k] for k in keys}, block_size=max_context)
    log(f"building GPT-2 timing graphs (cache {max_context:,} rows)")
    gpt = GPT(gcfg).eval()
    gpt_dir = work / "gpt"
    gpt_dir.mkdir()
    onnx_export.export_kv_layout(gpt, gpt_dir / "kv_rows.onnx", "rows")
    onnx_export.export_kv_layout(gpt, gpt_dir / "kv_concat.onnx", "concat")
    return gpt_dir, gcfg.to_dict(), export_no_memory(lmn_config, work, ("fp32",), log)


