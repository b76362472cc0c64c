"""The execution providers spac knows, by its own short names, with ONNX Runtime's names for them.

Kept free of imports so that profiles and command lines can list the names without loading ORT."""

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
