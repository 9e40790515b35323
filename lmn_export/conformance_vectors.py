"""Write `conformance.json` for an export folder whose parity passed: cases that start empty, cross
into the fast paths, feed a prompt at once (prefill), feed chunks at once mid-stream (prefill from a
state), start at high pointers and generate greedily;
expected outputs from this runtime (itself gated against PyTorch), per precision the folder holds."""

from __future__ import annotations

import json
from pathlib import Path

import runtime
from runtime import conformance
from runtime.atomic import write_atomic
from runtime.backends import FastPathRule

# Logit tolerance per precision, for any runtime. fp32: the export gates every graph at 1e-4 from
# PyTorch, so two conforming runtimes are within 2e-4 of each other. Quantized graphs quantize their
# activations at run time (lmn.json quantization.activations) and each runtime's int8 kernels round
# and accumulate them their own way: onnxruntime-web (WASM) differs from onnxruntime's CPU kernels
# on the shipped LogMem-32 by up to 0.48 in a logit, with 95.3% argmax agreement at worst (measured
# with examples/node/verify.mjs --ort web). The bound is 1.0 and 95%; a broken kernel or scrambled
# scales moves logits by several units and agreement far below (tests/lmn_export/test_contract.py).
TOLERANCES = {
    "fp32": {"logits_atol": 2e-4, "min_argmax_agreement": 0.99},
    "int8": {"logits_atol": 1.0, "min_argmax_agreement": 0.95},
    "int4": {"logits_atol": 1.0, "min_argmax_agreement": 0.95},
    "dynamic-int8": {"logits_atol": 1.0, "min_argmax_agreement": 0.95},
}
PROMPT_TOKENS = 100
AFTER_PROMPT = 28
HIGH_POINTER_TOKENS = 64
GREEDY_TOKENS = 64
MID_STREAM_STEPS = 45  # stepped before the first mid-stream chunk: it prefills from pointer 45 (odd, past 2^5)
SECOND_CHUNK = 20  # a second chunk from pointer 145 (odd, past 2^7): long enough to prefill (min_prompt_tokens 16)
REACH_CAP = 4096


def check_steps(count: int) -> list[int]:
    """Steps whose logits are recorded: the first few, each power of two and its neighbours (where the
    memory's levels fill and the fast paths take over), and the last."""
    steps = {0, 1, 2, 3, count - 1}
    k = 4
    while k < count:
        steps |= {k - 2, k - 1, k, k + 1}
        k *= 2
    return sorted(s for s in steps if 0 <= s < count)


def case_plan(model: runtime.ExportedModel, text_ids: list[int]) -> list[dict]:
    """The cases (without expected outputs) for an export: what to feed from which pointer."""
    cfg = model.config
    def ids(n: int, offset: int = 0) -> list[int]:
        return [text_ids[(offset + i) % len(text_ids)] for i in range(n)]

    if cfg["arch"] == "gpt":  # a KV cache of block_size rows: half fed, the rest (up to 64) generated
        n = min(cfg["block_size"] // 2, 256)
        return [{"name": "from-empty", "start_pointer": "0", "tokens": ids(n),
                 "generate": min(GREEDY_TOKENS, cfg["block_size"] - n)}]
    rule = FastPathRule.for_max_levels(cfg["max_levels"])
    reach = min(rule.valid_from_pointer + 1 + 64, REACH_CAP)
    top = model.pointer_max - HIGH_POINTER_TOKENS + 1  # the last input pointer of the case is pointer.max
    return [
        {"name": "from-empty-into-fast-paths", "start_pointer": "0", "tokens": ids(reach)},
        {"name": "prompt-then-steps", "start_pointer": "0", "prompt": ids(PROMPT_TOKENS, 7),
         "tokens": ids(AFTER_PROMPT, 7 + PROMPT_TOKENS), "generate": GREEDY_TOKENS},
        {"name": "prefill-mid-stream", "start_pointer": "0", "tokens": ids(MID_STREAM_STEPS, 3),
         "chunks": [ids(PROMPT_TOKENS, 3 + MID_STREAM_STEPS), ids(SECOND_CHUNK, 3 + MID_STREAM_STEPS + PROMPT_TOKENS)],
         "generate": GREEDY_TOKENS // 2},
        {"name": "across-2^31", "start_pointer": str(2**31 - HIGH_POINTER_TOKENS // 2), "tokens": ids(HIGH_POINTER_TOKENS, 13)},
        {"name": "up-to-pointer-max", "start_pointer": str(top), "tokens": ids(HIGH_POINTER_TOKENS, 29)},
    ]


def expected_case(model: runtime.ExportedModel, plan: dict, precision: str) -> dict:
    """A planned case with the outputs this runtime gives: argmax at every step, logits at `check_steps`,
    and (for the prompt case) greedy ids with their top-2 margins."""
    steps = (1 if plan.get("prompt") else 0) + len(plan["tokens"]) + len(plan.get("chunks", []))
    checks = check_steps(steps)
    plan = dict(plan)
    greedy = plan.pop("generate", 0)
    observed = conformance.run_case(model, plan, checks, greedy)
    case = {**plan, "precision": precision, "argmax": observed.argmax,
            "logits": {str(s): [float(f"{v:.9g}") for v in observed.logits[s]] for s in checks}}
    if greedy:
        case["greedy"] = {"ids": observed.greedy, "margins": [round(m, 6) for m in observed.greedy_margins],
                          "text": model.vocab.decode(observed.greedy)}
    return case


def write_conformance(directory: Path, text_ids: list[int], progress=lambda message: None) -> dict:
    """Write conformance.json for every ONNX precision in `directory`, check it with the runtime, and
    return the manifest's `conformance` field. Raises ValidationError-like RuntimeError when the
    runtime does not reproduce its own vectors (a nondeterministic graph)."""
    manifest = runtime.read_manifest(directory)
    cases = []
    for precision in manifest.precisions("onnx"):
        progress(f"writing conformance vectors ({precision})")
        model = runtime.load(directory, precision=precision)
        cases += [expected_case(model, plan, precision) for plan in case_plan(model, text_ids)]
    import onnxruntime

    data = {"format": conformance.FORMAT, "format_version": conformance.FORMAT_VERSION,
            "about": conformance.__doc__.strip(), "expected_from": f"lmn runtime on onnxruntime {onnxruntime.__version__} (CPU)",
            "tolerances": {p: TOLERANCES[p] for p in manifest.precisions("onnx")},
            "cases": cases}
    write_atomic(directory / conformance.FILE, json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n")
    failed = [r for r in conformance.verify(directory) if not r.passed]
    if failed:
        raise RuntimeError(f"the runtime does not reproduce its own conformance vectors: {failed[0]}")
    return {"file": conformance.FILE, "verify": "lmn-verify DIR (see conformance.json 'about')"}
