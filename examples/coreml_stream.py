"""The same stream API on Core ML (macOS only; needs `pip install coremltools`).

    lmn-export --to all --out exports/default     # writes model.mlpackage beside model.onnx
    python examples/coreml_stream.py exports/default

Elsewhere it exits at once with a one-line message (use examples/stream.py there: onnxruntime);
`runtime.load(..., backend="coreml")` itself raises BackendError off macOS.
"""

import platform
import sys

import runtime

if platform.system() != "Darwin":
    sys.exit(f"Core ML runs only on macOS (this is {platform.system()}); "
             "on this machine run examples/stream.py (onnxruntime)")
try:
    model = runtime.load(sys.argv[1] if len(sys.argv) > 1 else "exports/default", backend="coreml")
except (runtime.ManifestError, runtime.BackendError) as e:  # no export there, no Core ML graph, no coremltools
    sys.exit(f"coreml_stream.py: {e}")
stream = runtime.Stream(model)
stream.feed("JULIET:\n")  # the runtime's Core ML backend steps every token (prefill_<N>.mlpackage is for apps)
for char in stream.generate(300, temperature=0.8, seed=1):
    print(char, end="", flush=True)
print(f"\n\n{stream.tokens_seen} tokens, {stream.tokens_per_second:,.0f} tokens/s on Core ML")
