"""ONNX Runtime sessions for the package's graphs, on the CPU or the CUDA execution provider.

onnxruntime-gpu lists CUDAExecutionProvider even without a GPU and then silently falls back to
the CPU, so we check what a session really got (`get_providers()`), not what is available.
"""

from __future__ import annotations

import logging
import os

import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
log = logging.getLogger("spac")


class ProviderUnavailable(RuntimeError):
    pass


def cuda_available() -> bool:
    return PROVIDERS["cuda"] in ort.get_available_providers()


class SessionFactory:
    """Creates sessions with one set of options: thread count and, per provider, its options."""

    def __init__(self, threads: int | None = None, provider_options: dict | None = None):
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.log_severity_level = 3
        if threads:
            self.options.intra_op_num_threads = threads
            self.options.inter_op_num_threads = 1
        # Every session owns a thread pool, and a package has hundreds of sessions (one per
        # expert). Spinning idle workers then starve the one running session: measured 63 ms per
        # expert call with spinning against 0.8 ms without (hidden 1024, 64 sessions, 2 cores).
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.provider_options = provider_options or {}

    def create(self, model: str | os.PathLike | bytes, provider: str = "cpu") -> ort.InferenceSession:
        """A session for a model file, or for a serialized model (bytes)."""
        providers = [(PROVIDERS[provider], self.provider_options.get(provider, {}))]
        if provider != "cpu":
            providers.append((PROVIDERS["cpu"], {}))
        source = model if isinstance(model, bytes) else str(model)
        session = ort.InferenceSession(source, self.options, providers=providers)
        if PROVIDERS[provider] not in session.get_providers():
            name = "an in-memory graph" if isinstance(model, bytes) else model
            raise ProviderUnavailable(f"{PROVIDERS[provider]} could not be used for {name}")
        return session
