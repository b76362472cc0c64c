"""The routed-expert ONNX graph, built by hand with onnx.helper.

One graph shape serves every expert of a model, so the exporter builds it once and stamps out
one small .onnx per expert whose initializers point into that expert's own .data file (the
paging unit). The same graph with the weights as inputs lets one session compute any expert
from weights the pager holds in memory.

With block quantization (spac.ops.quantization) each weight matrix is stored as its MatMulNBits
tensors (WEIGHT.q, WEIGHT.scales, WEIGHT.zero_points) and multiplied by a MatMulNBits node;
biases stay in the float dtype.

Variants (x: [N, H] -> y: [N, H]):
  swiglu      g, u = split(x @ w_gate_up);            y = (silu(g) * u) @ w_down
  swiglu_oss  g, u = split(x @ w_gate_up + b_gate_up); g = min(g, limit); u = clip(u, -limit, limit)
              y = ((u + 1) * g * sigmoid(alpha * g)) @ w_down + b_down          (GPT-OSS)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .quantization import CONTRIB_DOMAIN, BlockQuantization

OPSET = 20
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}
ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}


@dataclass(frozen=True)
class ExpertTensor:
    name: str
    shape: tuple[int, ...]
    offset: int  # byte offset inside the expert's .data file
    nbytes: int
    dtype: str  # "float32", "float16" or (a quantized weight's codes and zero points) "uint8"

    def manifest_entry(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "offset": self.offset, "nbytes": self.nbytes,
                "dtype": self.dtype}


def expert_matrices(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """The weight matrices [K, N] of one expert (x @ W), by name."""
    return {"w_gate_up": (hidden, 2 * intermediate), "w_down": (intermediate, hidden)}


def expert_tensors(variant: str, hidden: int, intermediate: int, dtype: str,
                   quantization: BlockQuantization | None = None) -> list[ExpertTensor]:
    """The tensors of one expert and where each lies in its .data file, in file order."""
    matrices = expert_matrices(hidden, intermediate)
    shapes = []
    for name, bias in (("w_gate_up", "b_gate_up"), ("w_down", "b_down")):
        k, n = matrices[name]
        if quantization is None:
            shapes.append((name, (k, n), dtype))
        else:
            shapes += [(f"{name}.{part}", shape, part_dtype or dtype) for part, shape, part_dtype
                       in quantization.shapes(k, n)]
        if variant == "swiglu_oss":
            shapes.append((bias, (n,), dtype))
    tensors, offset = [], 0
    for name, shape, tensor_dtype in shapes:
        nbytes = int(np.prod(shape)) * np.dtype(tensor_dtype).itemsize
        tensors.append(ExpertTensor(name, shape, offset, nbytes, tensor_dtype))
        offset += nbytes
    return tensors


def _matmul(x: str, weight: str, output: str, k: int, n: int, quantization: BlockQuantization | None):
    if quantization is None:
        return helper.make_node("MatMul", [x, weight], [output])
    return quantization.node(x, weight, output, k, n)


def _nodes(variant: str, limit: float | None, alpha: float | None, onnx_dtype: int, matrices: dict,
           quantization: BlockQuantization | None):
    nodes = [_matmul("x", "w_gate_up", "gate_up", *matrices["w_gate_up"], quantization)]
    initializers = []
    if variant == "swiglu_oss":
        nodes.append(helper.make_node("Add", ["gate_up", "b_gate_up"], ["gate_up_b"]))
    nodes.append(helper.make_node("Split", ["gate_up_b" if variant == "swiglu_oss" else "gate_up"],
                                  ["gate", "up"], axis=-1, num_outputs=2))
    if variant == "swiglu":
        nodes += [
            helper.make_node("Sigmoid", ["gate"], ["gate_sig"]),
            helper.make_node("Mul", ["gate", "gate_sig"], ["gate_act"]),
            helper.make_node("Mul", ["gate_act", "up"], ["hidden"]),
            _matmul("hidden", "w_down", "y", *matrices["w_down"], quantization),
        ]
        return nodes, initializers
    np_dtype = np.float16 if onnx_dtype == TensorProto.FLOAT16 else np.float32
    for name, value in (("limit", limit), ("neg_limit", -limit), ("alpha", alpha), ("one", 1.0)):
        initializers.append(onnx.numpy_helper.from_array(np.array(value, dtype=np_dtype), name))
    nodes += [
        helper.make_node("Min", ["gate", "limit"], ["gate_c"]),
        helper.make_node("Clip", ["up", "neg_limit", "limit"], ["up_c"]),
        helper.make_node("Mul", ["gate_c", "alpha"], ["gate_a"]),
        helper.make_node("Sigmoid", ["gate_a"], ["gate_sig"]),
        helper.make_node("Mul", ["gate_c", "gate_sig"], ["glu"]),
        helper.make_node("Add", ["up_c", "one"], ["up_1"]),
        helper.make_node("Mul", ["up_1", "glu"], ["hidden"]),
        _matmul("hidden", "w_down", "y_nb", *matrices["w_down"], quantization),
        helper.make_node("Add", ["y_nb", "b_down"], ["y"]),
    ]
    return nodes, initializers


def build_expert_graph(spec: dict, hidden: int, intermediate: int, dtype: str, data_file: str | None,
                       quantization: BlockQuantization | None = None) -> onnx.ModelProto:
    """The expert graph. With `data_file`, its weights are initializers stored in that external
    file; with None, they are graph inputs (one session computes any expert)."""
    onnx_dtype = DTYPES[dtype][1]
    variant = spec["variant"]
    matrices = expert_matrices(hidden, intermediate)
    nodes, constants = _nodes(variant, spec.get("limit"), spec.get("alpha"), onnx_dtype, matrices, quantization)
    tensors = expert_tensors(variant, hidden, intermediate, dtype, quantization)
    inputs = [helper.make_tensor_value_info("x", onnx_dtype, ["tokens", hidden])]
    if data_file is None:
        inputs += [helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], list(t.shape)) for t in tensors]
    else:
        constants += [external_tensor(t, data_file) for t in tensors]
    output = helper.make_tensor_value_info("y", onnx_dtype, ["tokens", hidden])
    graph = helper.make_graph(nodes, f"expert_{variant}", inputs, [output], initializer=constants)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(CONTRIB_DOMAIN, 1)] if quantization else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="moe-spac")
    model.ir_version = 9  # readable by onnxruntime >= 1.16, the oldest we support on devices
    return model


def external_tensor(tensor: ExpertTensor, data_file: str) -> TensorProto:
    """An initializer whose bytes lie in `data_file` (sessions.IN_MEMORY: given from memory)."""
    proto = TensorProto(name=tensor.name, data_type=ONNX_TYPES[tensor.dtype], dims=list(tensor.shape))
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_file), ("offset", str(tensor.offset)), ("length", str(tensor.nbytes))):
        proto.external_data.add(key=key, value=value)
    return proto


def weights_from_buffer(buffer, tensors: list[ExpertTensor]) -> dict[str, np.ndarray]:
    """Views of an expert's tensors inside the bytes of its .data file (no copy)."""
    return {t.name: np.frombuffer(buffer, t.dtype, count=t.nbytes // np.dtype(t.dtype).itemsize,
                                  offset=t.offset).reshape(t.shape) for t in tensors}
