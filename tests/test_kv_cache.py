"""Tests for spac.runtime.kv_cache: a layer graph's GroupQueryAttention node rewritten to append to
its cache in place, run step by step against the graph's own copying form (real ONNX Runtime
sessions on a small hand-built layer; the exported layers are tested in test_runtime.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from spac.runtime.kv_cache import LENGTHS, PASTS, CopiedCache, InPlaceCache, KVCache, in_place_graph

WIDTH, HEADS, KV_HEADS, DIM = 64, 4, 2, 16
SHAPES = [[1, KV_HEADS, 0, DIM]] * 2


def layer_graph(extra_reader: bool = False) -> onnx.ModelProto:
    """hidden [1, T, 64] (scaled by rope_cos, shifted by rope_sin) -> q, k, v -> GroupQueryAttention
    over past_first/past_second, its lengths from the past's shape as the exporter writes them.
    `extra_reader`: an output that reads the past's shape too."""
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal((WIDTH, heads * DIM), dtype=np.float32) * 0.2
               for name, heads in (("wq", HEADS), ("wk", KV_HEADS), ("wv", KV_HEADS))}
    nodes = [helper.make_node("Mul", ["hidden", "rope_cos"], ["scaled"]),
             helper.make_node("Add", ["scaled", "rope_sin"], ["x"]),
             *[helper.make_node("MatMul", ["x", name], [name[1]]) for name in weights],
             helper.make_node("Shape", ["past_first"], ["past_length"], start=2, end=3),
             helper.make_node("Shape", ["hidden"], ["new_length"], start=1, end=2),
             helper.make_node("Add", ["past_length", "new_length"], ["total64"]),
             helper.make_node("Cast", ["total64"], ["total1"], to=TensorProto.INT32),
             helper.make_node("Sub", ["total1", "one"], ["seqlens_k"]),
             helper.make_node("Squeeze", ["total1"], ["total"]),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", *PASTS, "seqlens_k", "total"],
                              ["hidden_out", "present_first", "present_second"], domain="com.microsoft",
                              num_heads=HEADS, kv_num_heads=KV_HEADS, scale=DIM ** -0.5)]
    cache = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, KV_HEADS, None, DIM]) for name in PASTS]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None, WIDTH])
              for name in ("hidden", "rope_cos", "rope_sin")] + cache
    outputs = [helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, [1, None, HEADS * DIM])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, KV_HEADS, None, DIM])
                for name in ("present_first", "present_second")]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("past_length", TensorProto.INT64, [1]))
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([1], np.int32), "one"))
    graph = helper.make_graph(nodes, "layer", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_the_rewrite_feeds_the_lengths_and_drops_the_shape_arithmetic():
    model = in_place_graph(layer_graph())
    assert model is not None
    attention = next(node for node in model.graph.node if node.op_type == "GroupQueryAttention")
    assert list(attention.input[5:7]) == [LENGTHS[5], LENGTHS[6]]
    assert {LENGTHS[5], LENGTHS[6]} <= {value.name for value in model.graph.input}
    assert not [node for node in model.graph.node if node.op_type in ("Shape", "Cast", "Sub", "Squeeze")]
    onnx.checker.check_model(model)


def test_graphs_of_another_form_keep_copying():
    """Another reader of the past (its buffer is longer than what it holds) or no single
    GroupQueryAttention node over the cache: not rewritten."""
    assert in_place_graph(layer_graph(extra_reader=True)) is None
    twice = layer_graph()
    twice.graph.node.append(onnx.NodeProto.FromString(twice.graph.node[-1].SerializeToString()))
    assert in_place_graph(twice) is None
    other_cache = layer_graph()
    other_cache.graph.node[-1].input[3] = "hidden"
    assert in_place_graph(other_cache) is None


def test_in_place_steps_equal_the_copying_graph_through_growth_and_rollback():
    """Prefill, decode past the first capacity, roll back, verify-sized steps: every output and the
    held cache equal the graph's own copying form, bit for bit."""
    copying, appending = session(layer_graph()), session(in_place_graph(layer_graph()))
    copied = KVCache([CopiedCache(SHAPES, np.float32)])
    in_place = KVCache([InPlaceCache(SHAPES, np.float32, context=256)])
    rng = np.random.default_rng(1)
    buffers_seen = set()
    for new, rollback in ((12, None), *[(1, None)] * 6, (5, 15), (5, None), (1, None), (3, 2), (1, None)):
        for cache in (copied, in_place):
            if rollback is not None:
                cache.truncate(rollback)
        hidden, cos, sin = (rng.standard_normal((1, new, WIDTH), dtype=np.float32) for _ in range(3))
        results = []
        for cache, graph in ((copied, copying), (in_place, appending)):
            step = cache.step_inputs(cos, sin, new)
            outputs, state = cache.layers[0].run(graph, hidden, step)
            cache.keep([state], list(range(new)))
            results.append(outputs[0].copy())
        np.testing.assert_array_equal(results[0], results[1])
        for want, got in zip(copied.layers[0].held(copied.length), in_place.layers[0].held(in_place.length)):
            np.testing.assert_array_equal(want, got)
        buffers_seen.add(id(in_place.layers[0].buffers[0]))
    assert in_place.layers[0].capacity == 32 and len(buffers_seen) == 2  # 16, then grown once
