"""moe-spac: Mixture-of-Experts inference on memory-constrained devices with ONNX Runtime."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import spac` stays cheap and `spac.export` (torch) is never pulled in by accident.
    if name == "Runtime":
        from spac.runtime import Runtime

        return Runtime
    raise AttributeError(name)
