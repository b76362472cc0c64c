"""Graph rewrites the exporter applies to trunk graphs after torch.onnx has made them. Each one
takes nodes out of every decode step; a decode layer's small nodes cost about as much as its
matmuls beyond the bandwidth bound.

RMS norms: the exported Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul chain becomes one
SimplifiedLayerNormalization, and a residual add before a norm joins it as
SkipSimplifiedLayerNormalization (ONNX Runtime contrib ops, on the CPU and CUDA EPs alike;
onnxscript's own rewrite rules find them). 2.7-5.1% more decode tokens/s in bench_runtime. A
norm without a scale (Llama 4's L2 q/k norm) becomes one with a scale of ones.

Sibling matmuls: projections that read the same input (attention's q, k and v; a shared
expert's gate and up) become one MatMul over their weights side by side, then a Split. A decode
step multiplies one row by each weight, which is bound by memory bandwidth: one larger product
streams better than three small ones and is one parallel section instead of three (3.5-8% more
decode tokens/s in bench_runtime). Each output column is computed as before, so the results are
bit-identical.

Rotary embeddings: transformers' `x * cos + rotate_half(x) * sin` on queries and keys [B, H, T,
D] (two Slices, a Neg, a Concat, two Muls and an Add each) becomes one com.microsoft
RotaryEmbedding. The layer graph is given this step's cos and sin [1, T, D] (the embed graph's
rope_cos and rope_sin, whose two halves are equal: transformers builds them as cat(freqs,
freqs)), so the node's cache is their first half [T, D/2] and its position ids start at 0: no
table of every position is needed, whatever the rotary scaling. Batch 1, as the runtime runs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnxscript.ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from spac.ops.quantization import CONTRIB_DOMAIN


class UnscaledRmsNormFusion(pattern.RewriteRuleClassBase):
    """x / sqrt(mean(x^2) + eps) in float32 -> SimplifiedLayerNormalization(x, ones)."""

    def pattern(self, op, x, epsilon):
        mean_square = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1, noop_with_empty_axes=0)
        return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon))))

    def check(self, op, x, epsilon, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not isinstance(_ir_utils.get_singleton_value(epsilon), float):
            return result.fail("epsilon is not a float constant", epsilon)
        if x.dtype != ir.DataType.FLOAT or x.shape is None or not isinstance(x.shape[-1], int):
            return result.fail("input is not float32 with a static last axis", x)
        return result

    def rewrite(self, op, x, epsilon, **_):
        ones = op.Constant(value=ir.tensor(np.ones(x.shape[-1], dtype=np.float32)))
        return op.SimplifiedLayerNormalization(x, ones, axis=-1, epsilon=_ir_utils.get_singleton_value(epsilon),
                                               stash_type=ir.DataType.FLOAT)


_unscaled_rms_norms = pattern.RewriteRuleSet([UnscaledRmsNormFusion.rule("UnscaledRmsNormFusion")])


def fuse_rms_norms(model: ir.Model) -> int:
    """Rewrite `model` in place; returns how many norms were fused. Scaled norms go first: an
    unscaled one is the inner part of each."""
    fused = fuse_rms_normalization(model)
    fused += _unscaled_rms_norms.apply_to_model(model)
    return fused + fuse_skip_rms_normalization(model)


class RotaryEmbeddingFusion(pattern.RewriteRuleClassBase):
    """x [B, H, T, D] * cos + rotate_half(x) * sin, cos and sin [1, T, D] unsqueezed over the
    heads -> RotaryEmbedding(x, position 0, cos[..., :D/2] as [T, D/2], likewise sin)."""

    def __init__(self):
        super().__init__("RotaryEmbeddingFusion")
        self.caches: dict = {}  # this step's cos or sin -> its [T, D/2] half, made once a graph

    def pattern(self, op, x, cos, sin, half, second_half, end):
        rotated = op.Concat(op.Neg(op.Slice(x, second_half, end, [3], [1])), op.Slice(x, [0], half, [3], [1]), axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, op, x, cos, sin, half, second_half, end, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT or x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return result.fail("input is not float32 [B, H, T, D] with a static D", x)
        head = x.shape[3]
        if not (_ir_utils.is_singleton_value(half, head // 2) and _ir_utils.is_singleton_value(second_half, head // 2)
                and _ir_utils.is_singleton_value(end, lambda value: value >= head)):
            return result.fail("x is not split into two halves", x)
        for value in (cos, sin):
            source = _heads_unsqueezed(value)
            if source is None or source.shape is None or len(source.shape) != 3 or source.shape[2] != head:
                return result.fail("cos/sin is not a [1, T, D] tensor unsqueezed over the heads", value)
        return result

    def rewrite(self, op, x, cos, sin, **_):
        half = x.shape[3] // 2
        position = op.Constant(value=ir.tensor(np.zeros(1, dtype=np.int64)))
        return op.RotaryEmbedding(x, position, self._half(op, _heads_unsqueezed(cos), half),
                                  self._half(op, _heads_unsqueezed(sin), half), interleaved=0, _domain=CONTRIB_DOMAIN)

    def _half(self, op, value, half: int):
        if value not in self.caches:
            starts, ends, axes = (op.Constant(value_ints=[index]) for index in (0, half, -1))
            first = op.Slice(value, starts, ends, axes)
            self.caches[value] = op.Reshape(first, op.Constant(value_ints=[-1, half]))
        return self.caches[value]

    def cleanup(self):
        self.caches.clear()


def _heads_unsqueezed(value: ir.Value) -> ir.Value | None:
    """The [1, T, D] tensor that `value` is Unsqueeze(., axis 1) of, else None."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze" or node.domain not in ("", "ai.onnx"):
        return None
    return node.inputs[0] if _ir_utils.is_singleton_value(node.inputs[1], 1) else None


_rotary_embeddings = pattern.RewriteRuleSet([RotaryEmbeddingFusion.rule()])


def fuse_rotary_embeddings(model: ir.Model) -> int:
    """Rewrite `model` in place; returns how many rotary embeddings were fused."""
    fused = _rotary_embeddings.apply_to_model(model)
    if fused:
        RemoveUnusedNodesPass()(model)  # the Unsqueezes the fused pairs shared
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)  # as torch.onnx leaves them
    return fused


def fuse_sibling_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place; returns how many groups were fused."""
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    siblings = defaultdict(list)
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            siblings[node.input[0], weight.dims[0], weight.data_type].append(node)
    fused = 0
    for (source, _, _), nodes in siblings.items():
        if len(nodes) > 1:
            _fuse(graph, source, nodes, [numpy_helper.to_array(weights[node.input[1]]) for node in nodes])
            fused += 1
    if fused:
        drop_unused_initializers(graph)
    return fused


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _fuse(graph: onnx.GraphProto, source: str, nodes: list, arrays: list[np.ndarray]) -> None:
    name = "fused_" + "_".join(node.name or node.output[0] for node in nodes)
    graph.initializer.extend([
        numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{name}.weight"),
        numpy_helper.from_array(np.array([a.shape[1] for a in arrays], dtype=np.int64), f"{name}.split"),
    ])
    # The fused pair goes where the first sibling was: its input is defined there, and the
    # other siblings' outputs are then only defined earlier than before.
    position = list(graph.node).index(nodes[0])
    for node in nodes:
        graph.node.remove(node)
    graph.node.insert(position, helper.make_node("Split", [f"{name}.out", f"{name}.split"],
                                                 [node.output[0] for node in nodes], name=f"{name}.split", axis=-1))
    graph.node.insert(position, helper.make_node("MatMul", [source, f"{name}.weight"], [f"{name}.out"], name=name))
