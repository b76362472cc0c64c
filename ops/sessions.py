"""ONNX Runtime sessions for the package's graphs, on the CPU or the CUDA execution provider.

onnxruntime-gpu lists CUDAExecutionProvider even without a GPU and then silently falls back to
the CPU, so we check what a session really got (`get_providers()`), not what is available.
"""

from __future__ import annotations

import ctypes
import logging
import os

import numpy as np
import onnxruntime as ort

from .providers import PROVIDERS

log = logging.getLogger("spac")


IN_MEMORY = "in-memory.data"  # the external data file of a graph whose weights come from memory: never read

# A newer ONNX Runtime (1.32 here; the Python binding came in late 2025) takes a graph's external
# data file from memory and copies what it needs, so the session owns its weights: once MLAS has
# prepacked them, ORT frees its copy and the caller frees the buffer. Older ones take external
# initializers only as arrays the caller keeps for the session's life, beside the prepacked
# copy: a block-quantized expert then costs 2.35-2.67x its bytes against 1.40-1.44x (measured
# RSS growth, ORT 1.32, int4 and int8, 2-18 MB experts).
COPIES_IN_MEMORY_FILES = hasattr(ort.SessionOptions, "add_external_initializers_from_files_in_memory")


class ProviderUnavailable(RuntimeError):
    pass


def in_memory_file(arrays: list[np.ndarray]):
    """The bytes of `arrays` end to end, as a graph's IN_MEMORY offsets place them: a view of the
    memory they already lie in that way (an expert's .data file as read, a stacked layer), valid
    while they live, else a copy."""
    start = end = arrays[0].ctypes.data
    for array in arrays:
        if not array.flags.c_contiguous or array.ctypes.data != end:
            return np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays])
        end += array.nbytes
    return (ctypes.c_char * (end - start)).from_address(start)


def cuda_available() -> bool:
    return PROVIDERS["cuda"] in ort.get_available_providers()


_global_pool_threads: int | None = None  # 0: this ONNX Runtime cannot make one


def use_global_pool(threads: int) -> bool:
    """Size the process-wide intra-op pool, once: ORT reads it when its environment is made, so
    the first factory's thread count holds for the process. False where ONNX Runtime has no such
    pool for Python (1.20, JetPack 6's): said once, and the sessions get a pool each."""
    global _global_pool_threads
    if _global_pool_threads is None:
        size_pool = getattr(ort.capi._pybind_state, "set_global_thread_pool_sizes", None)
        if size_pool is None:
            log.warning("ONNX Runtime %s has no global thread pool (set_global_thread_pool_sizes); "
                        "using a pool per session", ort.__version__)
            _global_pool_threads = 0
        else:
            size_pool(threads, 1)
            _global_pool_threads = threads
    return _global_pool_threads > 0


class SessionFactory:
    """Creates sessions with one set of options: thread count and, per provider, its options."""

    def __init__(self, threads: int | None = None, provider_options: dict | None = None, global_pool: bool = False):
        """`global_pool`: every session shares one process-wide intra-op pool. Faster (see below),
        but ORT then refuses any session in the process made without use_per_session_threads=False,
        so it is for processes where spac owns ONNX Runtime."""
        self.threads, self.global_pool = threads, global_pool
        self.options = self._new_options()
        self.provider_options = provider_options or {}

    def _new_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # A package has hundreds of sessions (one per expert). With a pool each, their idle
        # workers spinning after a run starve the one running session (63 ms per expert call
        # against 0.8 ms, hidden 1024, 64 sessions, 2 cores). Not spinning at all costs a futex
        # wake per parallel section (49-58 tok/s in bench_runtime); spinning only while a run
        # lasts (force_spinning_stop) costs one per run (62-64 tok/s). One process-wide pool
        # needs no wake at all (70-76 tok/s).
        if self.global_pool and use_global_pool(self.threads or os.cpu_count() or 1):
            options.use_per_session_threads = False
        else:  # (thread counts on a session that uses the global pool make ORT warn per session)
            if self.threads:
                options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def _options_with(self, initializers: dict) -> tuple[ort.SessionOptions, tuple | None]:
        """Options of their own (external data belongs to one session) that give the graph
        `initializers`, and what must outlive the session: None where ORT copies them (see
        COPIES_IN_MEMORY_FILES), else the arrays and their OrtValues."""
        options = self._new_options()
        # Without an arena a run's workspace is freed when it ends: MatMulNBits on a batch (a
        # prefill, a verify pass) dequantizes into one, which an arena would keep per session.
        options.enable_cpu_mem_arena = False
        if COPIES_IN_MEMORY_FILES:
            file = in_memory_file(list(initializers.values()))
            options.add_external_initializers_from_files_in_memory([IN_MEMORY], [file], [memoryview(file).nbytes])
            return options, None
        arrays = [np.ascontiguousarray(value) for value in initializers.values()]
        values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
        options.add_external_initializers(list(initializers), values)
        return options, (arrays, values)

    def create(self, model: str | os.PathLike | bytes, provider: str = "cpu",
               initializers: dict | None = None) -> ort.InferenceSession:
        """A session for a model file, or for a serialized model (bytes). `initializers` (name ->
        host array) supply the graph's external initializers, which lie in IN_MEMORY end to end
        in this order: ORT copies them, or (an older ORT) the session keeps the arrays alive."""
        providers = [(PROVIDERS[provider], self.provider_options.get(provider, {}))]
        if provider != "cpu":
            providers.append((PROVIDERS["cpu"], {}))
        source = model if isinstance(model, bytes) else str(model)
        options, kept = self._options_with(initializers) if initializers else (self.options, None)
        session = ort.InferenceSession(source, options, providers=providers)
        session.spac_initializers = kept  # (an older ORT) reads them in place for the session's lifetime
        if PROVIDERS[provider] not in session.get_providers():
            name = "an in-memory graph" if isinstance(model, bytes) else model
            raise ProviderUnavailable(f"{PROVIDERS[provider]} could not be used for {name}")
        return session
