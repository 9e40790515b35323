"""Stream text from an exported LMN with the runtime (numpy + onnxruntime only).

    python examples/stream.py                 # the shipped default model
    python examples/stream.py exports/mine    # any lmn-export folder

Writes romeo.state (the stream's state) in the current folder.
"""

import sys

import runtime

try:
    model = runtime.load(sys.argv[1] if len(sys.argv) > 1 else None)  # checks the manifest and file hashes
    stream = runtime.Stream(model)  # one conversation's state: a fixed few KB
    stream.feed("ROMEO:\nBut soft, what light through yonder window breaks?\n")  # long prompt: prefill graph
except (runtime.ManifestError, runtime.UnknownCharacterError) as e:  # the message says what to do
    sys.exit(f"stream.py: {e}")

for char in stream.generate(300, temperature=0.8, top_k=20, seed=1):  # characters as they are sampled
    print(char, end="", flush=True)

print(f"\n\n{stream.tokens_seen} tokens seen, state {stream.state_bytes:,} bytes, "
      f"{stream.tokens_per_second:,.0f} tokens/s")
stream.save("romeo.state")  # resume later with runtime.Stream(model).load("romeo.state")
