"""A package's ONNX graphs, checked before ONNX Runtime sees them.

ONNX Runtime opens whatever file an initializer's external-data location names (1.20 even
outside the model's folder), and a graph that is not what the runtime feeds fails deep inside a
run with ORT's own traceback. So each graph is parsed here without its external data: every
external-data location must be a listed file of the same package, within that file's size, and
the graph's inputs and outputs must be the ones its role in the manifest implies (names, order,
element types, and the manifest's dims where the graph fixes them).
"""

from __future__ import annotations

import posixpath

import onnx
from onnx import TensorProto

from spac.ops.expert_graph import DTYPES

from .manifest import Manifest, ManifestError, escapes_package

INTEGER_TENSORS = ("input_ids", "position_ids", "topk_ids")  # int64; every other tensor has the package dtype


def check_graph(manifest: Manifest, name: str, data: bytes | None = None) -> None:
    path = manifest.root / name
    try:
        model = (onnx.load_model_from_string(data) if data is not None
                 else onnx.load(str(path), load_external_data=False))
    except Exception as error:  # protobuf's DecodeError and onnx's own, whatever the bytes were
        raise ManifestError(f"package file {path} is not a valid ONNX graph ({' '.join(str(error).split())[:200]})"
                            ) from None
    _check_external_data(manifest, name, model)
    signature = _signature(manifest, name)
    if signature is not None:
        _check_signature(manifest, name, model, *signature)


def _graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    """Tensors in node attributes, subgraphs (If, Loop, Scan) included."""
    for node in nodes:
        for attribute in node.attribute:
            yield attribute.t
            yield from attribute.tensors
            for sparse in (attribute.sparse_tensor, *attribute.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for graph in (attribute.g, *attribute.graphs):
                yield from _graph_tensors(graph)


def _check_external_data(manifest: Manifest, name: str, model: onnx.ModelProto) -> None:
    tensors = [*_graph_tensors(model.graph), *(t for f in model.functions for t in _node_tensors(f.node))]
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        where = f"package file {manifest.root / name}: tensor {tensor.name!r} keeps its external data at {location!r}"
        target = posixpath.join(posixpath.dirname(name), location)
        if escapes_package(location) or target not in manifest.files:
            raise ManifestError(f"{where}, which is not a listed file of this package (external data must stay "
                                "inside the package, listed under files)")
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", 0))
        except ValueError:
            raise ManifestError(f"{where} with a non-integer offset or length") from None
        size = manifest.files[target]["bytes"]
        if offset < 0 or length < 0 or offset + length > size:
            raise ManifestError(f"{where}, offset {offset} length {length}: past the end of that file's "
                                f"{size} bytes (its external data does not fit)")


def _signature(manifest: Manifest, name: str):
    """(inputs {name: shape}, outputs [(name, shape)]) the runtime feeds and reads for the graph
    `name`, or None for a graph the runtime does not run. None in a shape: not checked."""
    for section in filter(None, (manifest.target, manifest.draft)):
        hidden, vocab = section.dims["hidden_size"], section.dims["vocab_size"]
        tokens = [1, None, hidden]
        if name == section.embed:
            return ({"input_ids": [1, None], "position_ids": [1, None]},
                    [("hidden", tokens), ("rope_cos", None), ("rope_sin", None)])
        if name == section.head:
            return {"hidden": tokens}, [("logits", [1, None, vocab])]
        for layer in section.layers:
            if name == layer.file:
                first, second = ([None if axis == 2 else d for axis, d in enumerate(s)] for s in layer.kv_shapes)
                inputs = {"hidden": tokens, "rope_cos": None, "rope_sin": None, "past_first": first,
                          "past_second": second}
                top_k, experts = section.dims.get("top_k"), section.dims.get("num_experts")
                outputs = ([("residual", tokens), ("moe_input", [None, hidden]), ("topk_ids", [None, top_k]),
                            ("topk_weights", [None, top_k]), ("router_logits", [None, experts])]
                           if layer.kind == "moe" else [("hidden_out", tokens)])
                return inputs, outputs + [("present_first", first), ("present_second", second)]
            if name == layer.post_experts:
                return {"residual": tokens, "routed": tokens}, [("hidden_out", tokens)]
    if name.removesuffix(".onnx") + ".data" in manifest.expert_data:
        hidden = manifest.target.dims["hidden_size"]
        return {"x": [None, hidden]}, [("y", [None, hidden])]
    return None


def _check_signature(manifest: Manifest, name: str, model: onnx.ModelProto, inputs: dict, outputs: list) -> None:
    graph = model.graph
    constants = {tensor.name for tensor in graph.initializer}
    fed = {value.name: value for value in graph.input if value.name not in constants}
    read = [value.name for value in graph.output]

    def fail(problem: str):
        raise ManifestError(f"package file {manifest.root / name} does not match the manifest: {problem}")

    if set(fed) != set(inputs):
        fail(f"its inputs are {sorted(fed)}, the runtime feeds {sorted(inputs)}")
    if read != [tensor for tensor, _ in outputs]:
        fail(f"its outputs are {read}, the runtime reads {[tensor for tensor, _ in outputs]}")
    values = {**fed, **{value.name: value for value in graph.output}}
    for tensor, shape in [*inputs.items(), *outputs]:
        kind = values[tensor].type.tensor_type
        dtype = TensorProto.INT64 if tensor in INTEGER_TENSORS else DTYPES[manifest.dtype][1]
        if kind.elem_type != dtype:
            fail(f"{tensor} is {TensorProto.DataType.Name(kind.elem_type)}, the manifest implies "
                 f"{TensorProto.DataType.Name(dtype)}")
        if shape is None or not kind.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
        if len(dims) != len(shape) or any(a is not None and b is not None and a != b for a, b in zip(dims, shape)):
            fail(f"{tensor} has shape {['?' if d is None else d for d in dims]}, the manifest implies "
                 f"{['?' if d is None else d for d in shape]} (its dims, kv_shapes and top_k)")
