#!/usr/bin/env python3
"""Per-call overhead of the ways to run a paged expert on ONNX Runtime, measured in one run:

  in-graph    the expert's own session, weights inside the graph (ResidentExperts)
  as-inputs   one session for every expert, weights fed as inputs (ExpertKernel: the pager's path)
  custom-op   the same expert behind a Python custom operator (onnxruntime-extensions) that
              fetches the weights itself, the shape a paging custom op would have. Python ops
              of onnxruntime-extensions live in its own domain, ai.onnx.contrib: an `ai.spac`
              domain needs a compiled custom-op library
  pager       PagedExperts.run for one token and one cached expert, minus nothing: what the
              runtime pays per MoE layer call on a hit

    python scripts/bench_op_overhead.py [--hidden 64] [--calls 2000] [--out results/bench_op_overhead.json]

A tiny expert (hidden 64) makes the kernel time negligible, so the figures are the overheads.
onnxruntime-extensions is not a dependency of the project: install it to measure the custom op.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from spac.ops.expert_graph import build_expert_graph, expert_tensors
from spac.ops.sessions import SessionFactory


CONTRIB = "ai.onnx.contrib"  # the only domain onnxruntime-extensions registers Python ops in


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(calls, 200)):  # warm-up
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def random_weights(hidden: int, intermediate: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {t.name: (rng.standard_normal(t.shape) * 0.05).astype(np.float32)
            for t in expert_tensors("swiglu", hidden, intermediate, "float32")}


def in_graph_session(sessions, weights, hidden, intermediate):
    model = build_expert_graph({"variant": "swiglu"}, hidden, intermediate, "float32", data_file=None)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(value, name) for name, value in weights.items())
    del model.graph.input[1:]
    return sessions.create(model.SerializeToString())


def custom_op_session(weights, hidden, intermediate):
    """A PagedExpert op: takes x and an expert id, looks the weights up itself."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    import onnxruntime as ort

    kernel_session = SessionFactory(1).create(
        build_expert_graph({"variant": "swiglu"}, hidden, intermediate, "float32", data_file=None).SerializeToString())

    @onnx_op(op_type="PagedExpert", domain=CONTRIB, inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
             outputs=[PyCustomOpDef.dt_float])
    def paged_expert(x, expert_id):
        return kernel_session.run(None, {"x": x, **weights})[0]

    node = helper.make_node("PagedExpert", ["x", "expert"], ["y"], domain=CONTRIB)
    graph = helper.make_graph([node], "paged_expert",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", hidden]),
                               helper.make_tensor_value_info("expert", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", hidden])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(CONTRIB, 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("results/bench_op_overhead.json"))
    args = parser.parse_args(argv)
    hidden, intermediate = args.hidden, args.hidden // 2
    sessions = SessionFactory(1)
    weights = random_weights(hidden, intermediate)
    x = np.ones((1, hidden), np.float32)
    in_graph = in_graph_session(sessions, weights, hidden, intermediate)
    as_inputs = sessions.create(build_expert_graph({"variant": "swiglu"}, hidden, intermediate, "float32",
                                                   data_file=None).SerializeToString())
    figures = {
        "in_graph_us": per_call_us(lambda: in_graph.run(None, {"x": x}), args.calls),
        "as_inputs_us": per_call_us(lambda: as_inputs.run(None, {"x": x, **weights}), args.calls),
    }
    try:
        custom = custom_op_session(weights, hidden, intermediate)
        expert = np.zeros(1, np.int64)
        figures["custom_op_us"] = per_call_us(lambda: custom.run(None, {"x": x, "expert": expert}), args.calls)
    except ImportError:
        print("onnxruntime-extensions is not installed: custom-op overhead not measured", file=sys.stderr)
    figures["pager_hit_us"] = pager_hit_us(hidden, args.calls)
    print(json.dumps(figures, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))


def pager_hit_us(hidden: int, calls: int) -> float:
    """PagedExperts.run of one token on one cached expert, on a real exported package."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_models
    from spac.export.cli import main as export_main, quiet_exporter_logs
    from spac.ops.pager import PagedExperts
    from spac.runtime.manifest import load_manifest

    quiet_exporter_logs()
    with tempfile.TemporaryDirectory() as work:
        model, draft = make_models.make_pair("qwen3_moe", Path(work) / "models")
        package = Path(work) / "package"
        export_main([str(model), "--draft", str(draft), "-o", str(package), "--quiet", "--no-verify"])
        manifest = load_manifest(package)
        pager = PagedExperts(manifest, SessionFactory(1), manifest.expert_bytes_total(), "lru")
        layer = manifest.target.moe_layers[-1]  # the last layer: each call is a whole pass
        dims = manifest.target.dims
        x = np.ones((1, dims["hidden_size"]), np.float32)
        ids = np.arange(dims["top_k"], dtype=np.int64)[None]
        gates = np.full((1, dims["top_k"]), 1.0 / dims["top_k"], np.float32)
        try:
            per_layer = per_call_us(lambda: pager.run(layer, x, ids, gates), calls)
        finally:
            pager.close()
        return per_layer / dims["top_k"]  # per expert


if __name__ == "__main__":
    main()
