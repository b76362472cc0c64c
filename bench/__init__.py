"""What the benchmarks under scripts/ share: the prompts they generate from (openings of
standard-library functions), the routing traces recorded from a Runtime, the replay that models
a device profile from those traces with the runtime's own cache policy, and the measuring loop.
Imports numpy and the runtime (ONNX Runtime) only; never torch."""
