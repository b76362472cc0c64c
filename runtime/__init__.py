"""The device side of moe-spac: runs a spac package with ONNX Runtime (no torch, no transformers)."""

from spac.ops.storage import ExpertFileError, PackageFileError

from .manifest import ManifestError
from .runtime import Generation, GenerationError, GenerationResult, Runtime

__all__ = ["Runtime", "Generation", "GenerationResult", "GenerationError", "PackageFileError", "ManifestError", "ExpertFileError"]
