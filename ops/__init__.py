"""The execution layer under the runtime: ONNX Runtime sessions, one routed expert as an ONNX
graph, and the expert stack (every expert resident, or paged between storage, a host RAM cache
and device slots). Depends on numpy, onnx and onnxruntime only."""
