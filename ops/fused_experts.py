"""A MoE layer's block-quantized experts as one ONNX Runtime session: the contrib op `QMoE` over
all of the layer's experts, stacked, instead of a session per expert.

Decode is where it pays: a token's top-k experts were k session runs (about 70 us each of ORT and
Python around 20-40 us of int4 kernel, the 432 M shape of scripts/bench_runtime.py); QMoE runs
them in one, on the same MLAS kernels (accuracy_level 4: int8 activations), so each expert's
output is the per-expert session's to float rounding (max abs difference 5e-7 on outputs of
size 2.6); only the order of the weighted sum differs. 1.2x the decode tokens/s of sessions per
expert there (200 against 168 tok/s, interleaved in one process). Float experts stay a session
each: ORT's float `MoE` op runs each expert's GEMV on one thread without prepacked weights,
slower than the sessions (1.17 against 0.93 ms a layer, hidden 1024, top-4 of 32).

Joined to its trunk graph (`joined_to`, spac.runtime.model.ModelRunner.join_experts), a layer is
one session run instead of two, the routing scattered into QMoE's inputs inside the graph: 1.14x
more (268 against 234 tok/s, same shape and process). A post-norm layer, whose experts feed a
graph of their own, runs its QMoE session apart.

Memory: the stacked layer is one buffer that ONNX Runtime copies (spac.ops.sessions.
COPIES_IN_MEMORY_FILES) and frees once prepacked; the buffer goes with this object. Resident
int4 experts then take 548 MB of RSS for 246 MB stored, against 489 MB as a session per expert
(bench_runtime.py's shape, after load). An ORT that kept the caller's arrays would hold them
beside its prepacked copy (621 MB for the experts alone), so the layers are used only where it
copies (`fusable`).

The routing is the trunk's, exactly: QMoE picks each row's top-k from `router_probs` (our ids
get k, k-1, ..., 1 and every other expert 0) and sums with `router_weights` (our weights at our
ids), so no family's router has to fit QMoE's own softmax. The layouts line up without
re-quantizing: an expert's MatMulNBits tensors [N, K/block, block*bits/8] are QMoE's per-expert
[N, K*bits/8] rows; the gate and up halves of w_gate_up are interleaved row by row (QMoE's
swiglu_fusion=1, the only fused layout its CPU kernel takes). GPT-OSS's clamped SwiGLU is QMoE's
swiglu with activation_beta=1 and swiglu_limit.

ONNX Runtime 1.20, the oldest this package supports, has no CPU QMoE with router weights and
zero points: `available()` runs a tiny layer once per process, and where that fails the caller
keeps a session per expert.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from .expert_graph import DTYPES, OPSET, ExpertTensor, expert_tensors, external_tensor
from .quantization import ACCURACY_LEVEL, CONTRIB_DOMAIN, BlockQuantization
from .sessions import COPIES_IN_MEMORY_FILES, IN_MEMORY, SessionFactory

log = logging.getLogger("spac")

GRAPH_INPUTS = ("x", "router_probs", "router_weights")
# QMoE's inputs by position; "" leaves one out.
QMOE_INPUTS = ("x", "router_probs", "fc1.q", "fc1.scales", "fc1.bias", "fc2.q", "fc2.scales", "fc2.bias",
               "", "", "", "fc1.zero_points", "fc2.zero_points", "", "router_weights")
SOURCES = {"fc1": ("w_gate_up", "b_gate_up"), "fc2": ("w_down", "b_down")}  # QMoE's name -> the expert's


def qmoe_name(expert_tensor: str) -> str:
    """QMoE's name for an expert tensor: w_gate_up.q -> fc1.q, b_down -> fc2.bias."""
    for fc, (weight, bias) in SOURCES.items():
        if expert_tensor == bias:
            return f"{fc}.bias"
        if expert_tensor.startswith(weight + "."):
            return fc + expert_tensor[len(weight):]
    raise ValueError(f"no QMoE input takes the expert tensor {expert_tensor!r}")


def stacked_shapes(tensors, num_experts: int) -> dict[str, tuple[int, ...]]:
    """QMoE's tensors for a layer of experts with these ExpertTensors: each expert's rows (output
    features) flattened, one expert after the other."""
    return {qmoe_name(t.name): (num_experts, t.shape[0], *([int(np.prod(t.shape[1:]))] if len(t.shape) > 1 else []))
            for t in tensors}


def interleave_gate_up(rows: np.ndarray) -> np.ndarray:
    """[gate rows; up rows] -> gate 0, up 0, gate 1, up 1, ... (QMoE's swiglu_fusion=1)."""
    half = len(rows) // 2
    out = np.empty_like(rows)
    out[0::2], out[1::2] = rows[:half], rows[half:]
    return out


def stack_layer(read_expert, tensors, num_experts: int, progress=None) -> dict[str, np.ndarray]:
    """A layer's experts as QMoE's stacked tensors, end to end in one buffer (which a session
    then copies from at once: spac.ops.sessions.in_memory_file); `read_expert(e)` gives expert
    e's tensors."""
    shapes = {name: (shape, np.dtype(t.dtype)) for (name, shape), t in zip(stacked_shapes(tensors, num_experts).items(), tensors)}
    buffer = bytearray(sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in shapes.values()))
    stacked, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        stacked[name] = np.frombuffer(buffer, dtype, int(np.prod(shape)), offset).reshape(shape)
        offset += stacked[name].nbytes
    for expert in range(num_experts):
        weights = read_expert(expert)
        for t in tensors:
            rows = weights[t.name].reshape(t.shape[0], -1) if len(t.shape) > 1 else weights[t.name]
            name = qmoe_name(t.name)
            stacked[name][expert] = (interleave_gate_up(rows) if name.startswith("fc1.") else rows).reshape(
                stacked[name].shape[1:])
        if progress:
            progress(1)
    return stacked


def qmoe_node(spec: dict, top_k: int, quantization: BlockQuantization, weights, inputs: dict, output: str):
    """The QMoE node over the stacked `weights` (names), reading `inputs` for x, router_probs and
    router_weights."""
    oss = spec["variant"] == "swiglu_oss"
    names = [inputs.get(name) or (name if name in weights else "") for name in QMOE_INPUTS]
    return helper.make_node(
        "QMoE", names, [output], domain=CONTRIB_DOMAIN, k=top_k, activation_type="swiglu", swiglu_fusion=1,
        normalize_routing_weights=0, activation_alpha=float(spec["alpha"]) if oss else 1.0,
        activation_beta=1.0 if oss else 0.0, **({"swiglu_limit": float(spec["limit"])} if oss else {}),
        expert_weight_bits=quantization.bits, block_size=quantization.block_size, accuracy_level=ACCURACY_LEVEL)


def in_memory_initializers(weights: dict[str, np.ndarray]) -> list:
    """Initializers that SessionFactory.create's `initializers` give from memory: end to end in
    IN_MEMORY, in the dict's order."""
    tensors, offset = [], 0
    for name, weight in weights.items():
        tensors.append(external_tensor(ExpertTensor(name, weight.shape, offset, weight.nbytes, weight.dtype.name), IN_MEMORY))
        offset += weight.nbytes
    return tensors


def qmoe_graph(spec: dict, hidden: int, num_experts: int, top_k: int, dtype: str, quantization: BlockQuantization,
               weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The layer's experts: x [T, hidden], router_probs and router_weights [T, experts] -> y [T,
    hidden]. The stacked `weights` are initializers given from memory."""
    onnx_dtype = DTYPES[dtype][1]
    node = qmoe_node(spec, top_k, quantization, weights, {name: name for name in GRAPH_INPUTS}, "y")
    inputs = [helper.make_tensor_value_info("x", onnx_dtype, ["tokens", hidden])]
    inputs += [helper.make_tensor_value_info(name, onnx_dtype, ["tokens", num_experts]) for name in GRAPH_INPUTS[1:]]
    graph = helper.make_graph([node], "layer_experts", inputs,
                              [helper.make_tensor_value_info("y", onnx_dtype, ["tokens", hidden])],
                              in_memory_initializers(weights))
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="moe-spac")
    model.ir_version = 9
    return model


class FusedLayerExperts:
    """One MoE layer's experts as a QMoE session over their stacked weights."""

    def __init__(self, manifest, sessions: SessionFactory, read_expert, progress=None):
        """`read_expert(e)`: the layer's expert e as its tensors (spac.ops.storage.ExpertFiles.read);
        `progress(1)` is told of each one stacked."""
        dims, experts = manifest.target.dims, manifest.target.experts
        self.num_experts, self.top_k = dims["num_experts"], dims["top_k"]
        self.dtype = DTYPES[manifest.dtype][0]
        tensors = expert_tensors(experts.spec["variant"], dims["hidden_size"], dims["expert_intermediate_size"],
                                 manifest.dtype, experts.quantization)
        self.spec, self.quantization, self.onnx_dtype = experts.spec, experts.quantization, DTYPES[manifest.dtype][1]
        self.weights = stack_layer(read_expert, tensors, self.num_experts, progress)
        self.graph = qmoe_graph(experts.spec, dims["hidden_size"], self.num_experts, self.top_k, manifest.dtype,
                                experts.quantization, self.weights)
        self.sessions, self._session = sessions, None

    @property
    def session(self):
        """The experts' own session, made when first run: a layer joined to its trunk graph
        (joined_to) never runs it, and its prepacked copy of the weights is not made."""
        if self._session is None:
            self._session = self.sessions.create(self.graph.SerializeToString(), initializers=self.weights)
            if self._session.spac_initializers is None:  # ORT copied them (sessions.COPIES_IN_MEMORY_FILES)
                self.weights = None
        return self._session

    def run(self, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        """The weighted sum of each row's routed experts; ids < 0 are empty slots."""
        probs = np.zeros((len(x), self.num_experts), self.dtype)
        weights = np.zeros_like(probs)
        rows, slots = np.nonzero(topk_ids >= 0)
        ids = topk_ids[rows, slots]
        probs[rows, ids] = topk_ids.shape[1] - slots  # ranks: QMoE's top-k picks exactly these (no ties)
        weights[rows, ids] = topk_weights[rows, slots]
        return self.session.run(None, {"x": x, "router_probs": probs, "router_weights": weights})[0]

    def joined_to(self, trunk: onnx.ModelProto) -> onnx.ModelProto:
        """The layer's trunk graph (spac.export.trunk: outputs residual, moe_input, topk_ids,
        topk_weights, router_logits, present_first, present_second) followed by these experts:
        outputs the layer's hidden state, topk_ids (for the stats and routing hooks) and the
        presents. The trunk's routing becomes QMoE's inputs in the graph, as run() makes them."""
        model = onnx.ModelProto()
        model.CopyFrom(trunk)
        graph = model.graph
        outputs = {output.name: output for output in graph.output}
        scalar = helper.make_tensor("zero", self.onnx_dtype, [1], [0])
        graph.node.extend([
            helper.make_node("Shape", ["router_logits"], ["qmoe/shape"]),
            helper.make_node("ConstantOfShape", ["qmoe/shape"], ["qmoe/zeros"], value=scalar),
            helper.make_node("Shape", ["topk_ids"], ["qmoe/ids_shape"]),
            helper.make_node("Expand", ["qmoe/ranks", "qmoe/ids_shape"], ["qmoe/slot_ranks"]),
            helper.make_node("ScatterElements", ["qmoe/zeros", "topk_ids", "qmoe/slot_ranks"], ["qmoe/probs"], axis=1),
            helper.make_node("ScatterElements", ["qmoe/zeros", "topk_ids", "topk_weights"], ["qmoe/weights"], axis=1),
            qmoe_node(self.spec, self.top_k, self.quantization, self.weights,
                      {"x": "moe_input", "router_probs": "qmoe/probs", "router_weights": "qmoe/weights"}, "qmoe/routed"),
            helper.make_node("Unsqueeze", ["qmoe/routed", "qmoe/batch_axis"], ["qmoe/routed_batch"]),
            helper.make_node("Add", ["residual", "qmoe/routed_batch"], ["layer_output"]),
        ])
        ranks = np.arange(self.top_k, 0, -1).astype(self.dtype)  # as run() gives them
        graph.initializer.extend([onnx.numpy_helper.from_array(ranks, "qmoe/ranks"),
                                  onnx.numpy_helper.from_array(np.array([0], np.int64), "qmoe/batch_axis"),
                                  *in_memory_initializers(self.weights)])
        kept = [helper.make_tensor_value_info("layer_output", self.onnx_dtype, None)]
        kept += [outputs[name] for name in ("topk_ids", "present_first", "present_second")]
        del graph.output[:]
        graph.output.extend(kept)
        if CONTRIB_DOMAIN not in {opset.domain for opset in model.opset_import}:
            model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
        return model


_available: dict[tuple, bool] = {}


def available(sessions: SessionFactory, dtype: str, quantization: BlockQuantization) -> bool:
    """Whether this ONNX Runtime runs QMoE on the CPU for such experts: a layer of two tiny ones
    (all-zero codes: every output is zero) is built and run, once per process."""
    key = (dtype, quantization)
    if key not in _available:
        _available[key] = _runs_qmoe(sessions, dtype, quantization)
    return _available[key]


def _runs_qmoe(sessions: SessionFactory, dtype: str, quantization: BlockQuantization) -> bool:
    block_size = quantization.block_size
    hidden = intermediate = 2 * block_size
    tensors = expert_tensors("swiglu", hidden, intermediate, dtype, quantization)
    zeros = {t.name: np.zeros(t.shape, np.dtype(t.dtype)) for t in tensors}
    weights = stack_layer(lambda expert: zeros, tensors, 2)
    graph = qmoe_graph({"variant": "swiglu"}, hidden, 2, 1, dtype, quantization, weights).SerializeToString()
    x = np.ones((1, hidden), DTYPES[dtype][0])
    try:
        session = sessions.create(graph, initializers=weights)
        y = session.run(None, {"x": x, "router_probs": np.array([[1, 0]], x.dtype),
                               "router_weights": np.array([[1, 0]], x.dtype)})[0]
    except Exception as error:  # NOT_IMPLEMENTED, no kernel for this type: any refusal means no
        log.info("QMoE unavailable for %s %s experts (%s); one session per expert instead", dtype, quantization.name,
                 str(error).splitlines()[0])
        return False
    return y.shape == x.shape and not y.any()


def fusable(manifest, sessions: SessionFactory) -> bool:
    """Whether the package's experts can run as QMoE layers on the CPU here: an ONNX Runtime
    that runs QMoE and copies the stacked weights (else they would stay beside its prepacked
    copy, 2.7x the stored bytes against 1.5x for a session per expert)."""
    quantization = manifest.target.experts.quantization
    return (quantization is not None and COPIES_IN_MEMORY_FILES
            and available(sessions, manifest.dtype, quantization))
