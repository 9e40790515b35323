"""The on-device LMN runtime: numpy and onnxruntime only (never torch)."""

from .manifest import FORMAT_VERSION, MANIFEST, Manifest, ManifestError, read_manifest

__all__ = ["FORMAT_VERSION", "MANIFEST", "Manifest", "ManifestError", "read_manifest"]
