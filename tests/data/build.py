"""Rebuild the small exports committed as test data, so that the runtime's tests need no torch:

    python -m tests.data.build        # from the repository root, with the [export] install
    python -m tests.data.build --quantized DIR   # not test data: a fresh tiny export with every
                                                 # precision, its vectors also run under qemu Haswell

`tiny/` and `other/`: tiny LMN checkpoints (16 wide, 2 layers, max_levels 8; seeds 0 and 1) exported
to ONNX (step, fast paths, one 32-token prefill graph; fp32) with conformance vectors. `bytes/`: a
tinylogmem-32 trained 3 steps with --vocab bytes on text holding é, 中 and 😀 (step graph only). Rebuild them
when the exporter changes what it writes (tests/conftest.py fails with this command when the
runtime no longer reads them)."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPORTS = {"tiny": 0, "other": 1}  # folder -> torch seed
WIDE = "é中😀"  # 2, 3 and 4 UTF-8 bytes


def make_export(root: Path, name: str, seed: int, quantize: tuple[str, ...] = (), other_cpus: bool = False) -> Path:
    """A tiny LMN checkpoint exported to ONNX (step + one 32-token prefill graph) under root/name."""
    import torch

    from lmn_export.export import ExportOptions, export
    from lmn_export.parity_text import SAMPLE
    from models import LMN, LMNConfig
    from models.checkpoint import save
    from models.data import CharVocab

    vocab = CharVocab.from_text(SAMPLE)
    torch.manual_seed(seed)
    model = LMN(LMNConfig(vocab_size=len(vocab), n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=8)).eval()
    save(root / f"{name}-ckpt", model, vocab)
    result = export(root / f"{name}-ckpt", root / name, ExportOptions(prefill_sizes=(32,), parity_tokens=40,
                                                                               quantize=quantize, other_cpus=other_cpus))
    assert result.passed
    return result.directory


def make_byte_export(root: Path) -> Path:
    """A tinylogmem-32 trained 3 steps with --vocab bytes on text holding é, 中 and 😀, exported to ONNX
    (the step graph alone) under root/export."""
    from click.testing import CliRunner

    from lmn_export.export import ExportOptions, export
    from models.train import main as train

    text = "".join(f"line {i}: café {WIDE} naïve 中文 😀!\n" for i in range(200))
    (root / "text.txt").write_text(text, encoding="utf-8")
    result = CliRunner().invoke(train, ["--data", str(root / "text.txt"), "--vocab", "bytes", "--out", str(root / "ckpt"),
                                        "--preset", "tinylogmem-32", "--steps", "3", "--batch", "2", "--block", "16",
                                        "--eval-interval", "1000", "--eval-batches", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    exported = export(root / "ckpt", root / "export", ExportOptions(prefill_sizes=(), parity_tokens=24, fast_paths=0))
    assert exported.passed
    return exported.directory


def main() -> None:
    if sys.argv[1:2] == ["--quantized"] and len(sys.argv) == 3:
        out = Path(sys.argv[2])
        with tempfile.TemporaryDirectory() as tmp:
            built = make_export(Path(tmp), out.name, 0, ("int8", "int4", "dynamic-int8"), other_cpus=True)
            shutil.copytree(built, out)
        checked = json.loads((out / "lmn.json").read_text(encoding="utf-8"))["conformance"]["other_cpus"]
        print(f"wrote {out}; its conformance vectors on other CPUs: {checked}")
        if any("skipped" in c for c in checked) and platform.machine() == "x86_64":
            sys.exit("the export's check on x86 without VNNI was skipped: install qemu-user")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed in EXPORTS.items():
            built = make_export(Path(tmp), name, seed)
            shutil.rmtree(HERE / name, ignore_errors=True)
            shutil.copytree(built, HERE / name)
            print(f"wrote {HERE / name}")
        built = make_byte_export(Path(tmp))
        shutil.rmtree(HERE / "bytes", ignore_errors=True)
        shutil.copytree(built, HERE / "bytes")
        print(f"wrote {HERE / 'bytes'}")


if __name__ == "__main__":
    main()
