"""Layer templates: decoder layers that share a structure are exported once and stamped with
each layer's weights, as routed experts are, so export time does not grow with depth.

A layer's structure is everything its graph depends on but its weights: module types, their
plain attributes (head counts, a sliding window, whether the layer rotates, ...; not the layer
index, which the modules only pass to the cache), tensor names, shapes and dtypes, and the values
of buffers no checkpoint holds. The first layer of a structure is exported (one torch.onnx
dynamo export) with random probe values in its weights; every initializer of that graph is
matched to the probe tensor it holds, as it is, transposed (the exporter folds a linear's
transpose into its initializer) or reshaped. Each layer of the structure, the first included, is then that
graph with its own tensors written into the matched initializers, and the graph rewrites that
read weights (fused sibling matmuls) run on it. Random probes make the match unambiguous even
where a model's tensors are equal (norm weights of ones).

A structure whose graph holds a tensor in any other form (an initializer computed from a weight,
a weight folded into a constant node) cannot be stamped: its layers are exported one by one, as
before, and a debug line says why.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, is_dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

log = logging.getLogger("spac.export")
PLAIN = (int, float, str, bool, type(None))
UNSTRUCTURAL_ATTRIBUTES = ("layer_idx", "index", "training")


def structure_key(module: nn.Module) -> tuple:
    """What a module's exported graph depends on, but for its weights' values."""
    parts = []
    for name, sub in module.named_modules():
        parts.append((name, type(sub).__qualname__, _attributes(sub)))
    for name, tensor in _weights(module).items():
        parts.append((name, tuple(tensor.shape), str(tensor.dtype)))
    persistent = _weights(module)
    for name, buffer in module.named_buffers():
        if name not in persistent:
            parts.append((name, _digest(buffer)))
    return tuple(parts)


def _attributes(module: nn.Module) -> tuple:
    attributes = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key in UNSTRUCTURAL_ATTRIBUTES:
            continue
        if isinstance(value, PLAIN) or is_dataclass(value):
            attributes.append((key, repr(value)))
        elif isinstance(value, (tuple, list)) and all(isinstance(item, PLAIN) for item in value):
            attributes.append((key, repr(value)))
        elif isinstance(value, torch.Tensor):
            attributes.append((key, _digest(value)))
    return tuple(attributes)


def _digest(tensor: torch.Tensor) -> str:
    if tensor.is_meta:
        return f"meta {tuple(tensor.shape)} {tensor.dtype}"
    data = tensor.detach().contiguous().view(torch.uint8) if tensor.dim() else tensor.detach().reshape(1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's floating-point parameters and persistent buffers: what a checkpoint holds."""
    return {name: tensor for name, tensor in module.state_dict(keep_vars=True).items()
            if tensor.is_floating_point()}


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


@dataclass
class Template:
    """One traced graph and where each layer's tensors go in it:
    initializer -> (tensor, transposed, the initializer's shape)."""

    graph: onnx.ModelProto
    recipe: dict[str, tuple[str, bool, tuple[int, ...]]] = field(default_factory=dict)

    def stamp(self, module: nn.Module) -> onnx.ModelProto:
        weights = _weights(module)
        model = onnx.ModelProto()
        model.CopyFrom(self.graph)
        for initializer, (name, transposed, shape) in self.recipe.items():
            array = _array(weights[name])
            array = np.ascontiguousarray(array.T if transposed else array).reshape(shape)
            model.graph.initializer.append(numpy_helper.from_array(array, initializer))
        return model


def make_template(module: nn.Module, trace) -> Template | None:
    """Trace `module` (`trace(module) -> ModelProto`) with probe weights; None if its weights
    cannot all be found again in the graph's initializers."""
    weights = _weights(module)
    real = {name: tensor.detach().clone() for name, tensor in weights.items()}
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for tensor in weights.values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype))
        graph = trace(module)
        recipe, why = _match(graph, {name: _array(tensor) for name, tensor in weights.items()})
    finally:
        with torch.no_grad():
            for name, tensor in weights.items():
                tensor.copy_(real[name])
    if recipe is None:
        log.debug("layers of %s's structure are exported one by one: %s", type(module).__name__, why)
        return None
    kept = [init for init in graph.graph.initializer if init.name not in recipe]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    return Template(graph, recipe)


def _match(graph: onnx.ModelProto, probes: dict[str, np.ndarray]):
    """(initializer -> (probe tensor, transposed, shape), None), or (None, why not)."""
    recipe = {}
    for initializer in graph.graph.initializer:
        value = numpy_helper.to_array(initializer)
        found = [(name, form) for name, probe in probes.items() if (form := _form(value, probe)) is not None]
        if len(found) > 1:
            return None, f"initializer {initializer.name} matches {len(found)} tensors"
        if found:
            recipe[initializer.name] = (*found[0], value.shape)
    unmatched = sorted(set(probes) - {source for source, _, _ in recipe.values()})
    if unmatched:
        return None, f"tensor {unmatched[0]} is not an initializer of the graph as it is, transposed or reshaped"
    return recipe, None


def _form(value: np.ndarray, probe: np.ndarray) -> bool | None:
    """Whether `value` holds `probe` transposed (True), as it is (False), or not at all (None)."""
    if _equal(value, probe):
        return False
    if probe.ndim == 2 and _equal(value, probe.T):
        return True
    return None


def _equal(value: np.ndarray, probe: np.ndarray) -> bool:
    """The same values in the same order, whatever the shape (the exporter reshapes, e.g. sinks)."""
    return value.size == probe.size and value.dtype == probe.dtype and np.array_equal(value.ravel(), probe.ravel())
