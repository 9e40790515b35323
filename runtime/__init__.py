"""The on-device LMN runtime: numpy and onnxruntime only (never torch).

    import runtime
    model = runtime.load()            # an export folder; the shipped default when omitted
    stream = runtime.Stream(model)
    stream.feed("ROMEO:\n")
    for char in stream.generate(200, temperature=0.8, seed=1):
        print(char, end="", flush=True)
"""

from .backends import BackendError
from .manifest import FORMAT_VERSION, MANIFEST, Manifest, ManifestError, read_manifest
from .model import DEFAULT_EXPORT, SMALL_EXPORT, ExportedModel, load
from .state_file import StateFileError
from .stream import ContextFullError, Stream
from .vocab import ByteVocab, UnknownCharacterError, Vocab

__all__ = [
    "DEFAULT_EXPORT", "SMALL_EXPORT", "FORMAT_VERSION", "MANIFEST", "BackendError", "ByteVocab", "ContextFullError", "ExportedModel", "Manifest", "ManifestError",
    "StateFileError", "Stream", "UnknownCharacterError", "Vocab", "load", "read_manifest",
]
