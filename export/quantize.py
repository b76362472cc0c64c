"""Weight-only block quantization at export, in ONNX Runtime's MatMulNBits format
(spac.ops.quantization describes the format; ONNX Runtime's own block quantizer,
onnxruntime.quantization.matmul_nbits_quantizer, computes the codes).

The exporter quantizes in two steps so that its own check stays a check of the export: first
every trunk weight that the package will store quantized is replaced, in the part of the model
just filled from the checkpoint, by its dequantized value (fake quantization: the part now
computes what the package will); then the part's graph is written (stamped, see stamping.py)
from it, and each such weight, whose values now lie on its blocks' grid, is stored as its
MatMulNBits tensors. Routed experts, read one at a time, are quantized as they are written
(expert_arrays). The reference the export is checked against, the whole transformers model,
is fake-quantized the same way. Requantizing a dequantized block gives its
codes back (the scales within a float ulp), so comparing the package with the fake-quantized
model still finds any export mistake. What quantization itself costs is measured against the
float32 export (README, accuracy table).

Routers stay in float: they are tiny, and a flipped expert choice costs more than any saving.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from spac.ops.quantization import BITS, BLOCK_SIZES, CLI_BLOCK_SIZES, CONTRIB_DOMAIN, BlockQuantization

from .families import ExportError, Family
from .fusion import drop_unused_initializers

KINDS = {f"int{bits}": bits for bits in BITS}  # --experts / --trunk values
GRID_TOLERANCE = 1e-6  # relative: a weight this close to its dequantized value lies on the grid
# Asymmetric block quantization is not idempotent: rounding the zero point can shrink a block's
# range, so its dequantized values requantize to another scale (on the random-weight model of
# scripts/bench_runtime.py, 17 % of the matrices at int8 and 1.6 % at int4 after one pass, among
# them attention projections and the LM head). grid_parts repeats quantize -> dequantize until
# the result requantizes to itself: at most 5 passes there, so this bound is never the limit.
GRID_PASSES = 8


def quantization_for(kind: str | None, block_size: int, symmetric: bool, flag: str) -> BlockQuantization | None:
    """The quantization a --experts / --trunk value asks for (None: float)."""
    if kind is None or kind == "float":
        return None
    if kind not in KINDS:
        raise ExportError(f"{flag} {kind!r} is not supported; valid: {', '.join(KINDS)}")
    if block_size not in BLOCK_SIZES:
        raise ExportError(f"--block-size {block_size} is not supported; valid: {', '.join(map(str, CLI_BLOCK_SIZES))}")
    return BlockQuantization(KINDS[kind], block_size, symmetric)


def grid_parts(weight: np.ndarray, quantization: BlockQuantization) -> dict[str, np.ndarray]:
    """The MatMulNBits tensors of a weight [K, N] whose dequantized value requantizes to them
    (see GRID_PASSES): what the package stores, so that a trunk weight fake-quantized with them
    is found on the grid again when its graph is written (quantize_graph_matmuls) and stored as
    MatMulNBits, not left in float."""
    parts = quantize_matrix(np.asarray(weight, dtype=np.float32), quantization)
    for _ in range(GRID_PASSES - 1):
        restored = dequantize(parts, quantization)
        again = quantize_matrix(restored, quantization)
        if _on_grid(restored, again, quantization):
            break
        parts = again
    return parts | {"scales": parts["scales"].astype(weight.dtype)}


def quantize_matrix(weight: np.ndarray, quantization: BlockQuantization) -> dict[str, np.ndarray]:
    """The MatMulNBits tensors of a weight [K, N] (x @ W), by part; scales in the weight's dtype."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    config = DefaultWeightOnlyQuantConfig(block_size=quantization.block_size, is_symmetric=quantization.symmetric,
                                          bits=quantization.bits)
    codes, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight, dtype=np.float32))
    parts = {"q": codes, "scales": scales.astype(weight.dtype)}
    if not quantization.symmetric:
        parts["zero_points"] = zero_points
    return parts


def _unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return codes.astype(np.float32)
    return np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1).astype(np.float32)


def dequantize(parts: dict[str, np.ndarray], quantization: BlockQuantization) -> np.ndarray:
    """The weight [K, N] that MatMulNBits multiplies by, in float32."""
    codes, scales = parts["q"], parts["scales"].astype(np.float32)
    n, blocks, _ = codes.shape
    if quantization.symmetric:
        zero_points = np.full((n, blocks), 2.0 ** (quantization.bits - 1), np.float32)
    else:
        zero_points = _unpack(parts["zero_points"], quantization.bits)[:, :blocks]
    values = (_unpack(codes, quantization.bits) - zero_points[..., None]) * scales[..., None]
    return values.reshape(n, -1).T


def fake_quantize_(tensor: torch.Tensor, axis: int, quantization: BlockQuantization, name: str) -> None:
    """Replace `tensor` in place by its dequantized value, blocks running along `axis` (the
    input dimension of the product it takes part in); ExportError when blocks do not fit."""
    refusal = quantization.refusal(tensor.shape[axis])
    if refusal:
        raise ExportError(f"{name} {list(tensor.shape)} cannot be quantized to {quantization.name}: {refusal}; "
                          f"choose a --block-size that divides it (valid: {', '.join(map(str, CLI_BLOCK_SIZES))})")
    with torch.no_grad():
        moved = tensor.movedim(axis, -1)  # every other axis becomes an output column of its own
        weight = moved.reshape(-1, moved.shape[-1]).T.float().numpy()
        restored = torch.from_numpy(dequantize(grid_parts(weight, quantization), quantization).T)
        tensor.copy_(restored.reshape(moved.shape).movedim(-1, axis).to(tensor.dtype))


def fake_quantize_experts(family: Family, model, moe_layers: list[int], quantization: BlockQuantization) -> None:
    for layer in moe_layers:
        experts = family.mlp_of(model.model.layers[layer]).experts
        for param, axis in family.expert_input_axes.items():
            fake_quantize_(getattr(experts, param), axis, quantization, f"layer {layer} experts.{param}")


def layer_linears(family: Family, layer: nn.Module, index: int) -> dict[str, nn.Linear]:
    """A decoder layer's linears that --trunk quantizes: attention, shared experts and dense
    MLPs; not the router, not routed experts."""
    mlp = family.mlp_of(layer)
    skipped = [mlp.experts, family.router_of(mlp)] if family.is_moe_layer(layer) else []
    inside = {id(module) for part in skipped for module in part.modules()}
    return {f"model.layers.{index}.{name}": module for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and id(module) not in inside}


def head_linears(model) -> dict[str, nn.Linear]:
    """The LM head, unless its weight is the embedding's (which stays float)."""
    return {} if model.lm_head.weight is model.model.embed_tokens.weight else {"lm_head": model.lm_head}


def trunk_linears(family: Family, model) -> dict[str, nn.Linear]:
    """Every linear of the trunk that --trunk quantizes, by name."""
    linears = {}
    for index, layer in enumerate(model.model.layers):
        linears.update(layer_linears(family, layer, index))
    return linears | head_linears(model)


def fake_quantize_linears(linears: dict[str, nn.Linear], quantization: BlockQuantization) -> None:
    for name, linear in linears.items():
        fake_quantize_(linear.weight, -1, quantization, f"{name}.weight")  # F.linear: x @ W.T


def fake_quantize_trunk(family: Family, model, quantization: BlockQuantization) -> None:
    """The whole loaded model's trunk (the export does it part by part, see trunk.py)."""
    fake_quantize_linears(trunk_linears(family, model), quantization)


def _on_grid(weight: np.ndarray, parts: dict, quantization: BlockQuantization) -> bool:
    scale = float(np.abs(weight).max()) or 1.0
    return float(np.abs(dequantize(parts, quantization) - weight).max()) <= GRID_TOLERANCE * scale


def quantize_graph_matmuls(model: onnx.ModelProto, quantization: BlockQuantization) -> int:
    """Store each constant weight of a MatMul (x @ W) or Gemm (x @ W.T, the router's and 2-D
    linears') that fake quantization put on the grid as MatMulNBits tensors, in place; others
    (routers, computed constants) stay. Returns how many were quantized."""
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    quantized = 0
    for node in list(graph.node):
        weight = _quantizable_weight(node, weights)
        if weight is None:
            continue
        k, n = weight.shape
        if quantization.refusal(k):
            continue
        parts = quantize_matrix(weight, quantization)
        if not _on_grid(weight, parts, quantization):
            continue
        name = f"{node.name or node.output[0]}.weight"
        graph.initializer.extend(numpy_helper.from_array(value, f"{name}.{part}") for part, value in parts.items())
        product = node.output[0] if len(node.input) < 3 else f"{name}.product"
        replacement = [quantization.node(node.input[0], name, product, k, n, name=f"{node.name}_nbits")]
        if len(node.input) == 3:  # Gemm's bias
            replacement.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
        quantized += 1
    if quantized:
        drop_unused_initializers(graph)
        if not any(opset.domain == CONTRIB_DOMAIN for opset in model.opset_import):
            model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return quantized


def _quantizable_weight(node, weights: dict) -> np.ndarray | None:
    """The constant weight [K, N] a MatMul or plain Gemm multiplies by, or None."""
    if node.op_type == "MatMul" and node.input[1] in weights:
        weight = numpy_helper.to_array(weights[node.input[1]])
        return weight if weight.ndim == 2 else None
    if node.op_type == "Gemm" and node.input[1] in weights:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return None
        weight = numpy_helper.to_array(weights[node.input[1]])
        return weight.T if attributes.get("transB", 0) else weight
    return None


def expert_arrays(weights: dict[str, np.ndarray], quantization: BlockQuantization | None) -> dict[str, np.ndarray]:
    """One expert's tensors by their names in spac.ops.expert_graph's layout (matrices as
    WEIGHT.q / .scales / .zero_points when quantized)."""
    if quantization is None:
        return weights
    arrays = {}
    for name, value in weights.items():
        if value.ndim == 2:
            arrays.update({f"{name}.{part}": array for part, array in grid_parts(value, quantization).items()})
        else:
            arrays[name] = value
    return arrays
