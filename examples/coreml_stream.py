"""The same stream API on Core ML (macOS only; needs `pip install coremltools`).

    lmn-export --to all --out exports/default     # writes model.mlpackage beside model.onnx
    python examples/coreml_stream.py exports/default

On Linux `runtime.load(..., backend="coreml")` raises BackendError: Core ML executes only on macOS.
"""

import sys

import runtime

model = runtime.load(sys.argv[1] if len(sys.argv) > 1 else "exports/default", backend="coreml")
stream = runtime.Stream(model)
stream.feed("JULIET:\n")  # Core ML has no prefill graph here: every token is a step
for char in stream.generate(300, temperature=0.8, seed=1):
    print(char, end="", flush=True)
print(f"\n\n{stream.tokens_seen} tokens, {stream.tokens_per_second:,.0f} tokens/s on Core ML")
