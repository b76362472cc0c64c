"""A model's KV cache: per layer its two tensors [1, heads, positions, dim], and the ids whose
positions they hold.

A layer graph takes its cache as the inputs past_first/past_second and returns it grown by this
step as present_first/present_second, new arrays: every step copies the whole cache (`CopiedCache`).
Where a layer's attention is one GroupQueryAttention node (float32 layers under a plain causal
mask, spac.export.attention), ONNX Runtime can instead write the step's keys and values into the
cache's own buffer: with the present outputs bound to the past inputs' buffers, the node reads how
many positions are valid from its seqlens_k input rather than from the buffer's shape, and
appends after them (`InPlaceCache`; `in_place_graph` makes the graph take those lengths as
inputs). Decode then copies nothing, which matters more as the context grows. Measured on one
such node (16 heads over 4 KV heads of 64, 2 threads, ORT 1.32): 63 against 26 us a step at 80
cached positions, 1.86 against 0.66 ms at 4,000; outputs and cache bit-identical (ORT 1.20 and
1.32).

Either way the cache changes only when every layer has run (the runner commits after the pass):
an in-place pass that fails midway has written past the valid length only, which the next pass
overwrites. Rolling back (`truncate`) just forgets positions.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

PASTS, PRESENTS = ("past_first", "past_second"), ("present_first", "present_second")
# GroupQueryAttention's length inputs (by position) as graph inputs of an in-place layer.
LENGTHS = {5: "kv_seqlens_k", 6: "kv_total_length"}
MIN_CAPACITY = 16  # positions an in-place buffer starts with (doubling from there, a copy each time)
KEPT_STEP_LENGTH = 16  # steps up to this many positions (decode, verify) keep their bindings


def in_place_graph(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model`, a layer graph, with its GroupQueryAttention node reading the cache's lengths from
    inputs instead of from the past's shape; None (and `model` spoilt) where the graph has another
    form. Nothing but that node may read the past or the present: in place, their buffer is
    longer than what they hold."""
    graph = model.graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"]
    if len(attention) != 1 or any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                  for node in graph.node for attribute in node.attribute):
        return None
    node = attention[0]
    if (len(node.input) < 7 or tuple(node.input[3:5]) != PASTS or tuple(node.output[1:3]) != PRESENTS
            or not set(PRESENTS) <= {output.name for output in graph.output}):
        return None
    for position, name in LENGTHS.items():
        node.input[position] = name
    graph.input.extend([helper.make_tensor_value_info(LENGTHS[5], TensorProto.INT32, [1]),
                        helper.make_tensor_value_info(LENGTHS[6], TensorProto.INT32, [])])
    drop_unused_nodes(graph)
    readers = [n for n in graph.node if set(PASTS + PRESENTS) & set(n.input)]
    return model if readers == [node] else None


def drop_unused_nodes(graph: onnx.GraphProto) -> None:
    """Removes nodes whose outputs nothing reads (the shape arithmetic the lengths replaced)."""
    while True:
        read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        unused = [node for node in graph.node if not read & set(node.output)]
        if not unused:
            return
        for node in unused:
            graph.node.remove(node)


class CopiedCache:
    """A layer's cache in the graph's own form: past in, past and this step out as new arrays."""

    def __init__(self, shapes, dtype):
        self.past = tuple(np.zeros(shape, dtype) for shape in shapes)

    def held(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(tensor[:, :, :length] for tensor in self.past)

    def run(self, session: ort.InferenceSession, hidden: np.ndarray, step: dict):
        """The layer's outputs but the presents, and what `keep` takes once the pass is over."""
        feeds = {"hidden": hidden, "rope_cos": step["rope_cos"], "rope_sin": step["rope_sin"]}
        *outputs, first, second = session.run(None, {**feeds, **dict(zip(PASTS, self.past))})
        return outputs, (first, second)

    def keep(self, presents) -> None:
        self.past = presents

    def truncate(self, length: int) -> None:
        self.past = self.held(length)


class InPlaceCache:
    """A layer's cache as buffers that its GroupQueryAttention node appends to (in_place_graph):
    capacity doubles from MIN_CAPACITY as needed, up to the model's context. Its runs go through
    a StepBinding per session and step length, kept while the buffers stay."""

    def __init__(self, shapes, dtype, context: int):
        self.shapes, self.dtype, self.context = shapes, dtype, context
        self.buffers: tuple[np.ndarray, ...] = tuple(np.zeros(shape, dtype) for shape in shapes)
        self.bindings: dict[tuple[int, int], StepBinding] = {}  # by (session id, new positions)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def held(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(buffer[:, :, :length] for buffer in self.buffers)

    def reserve(self, positions: int) -> None:
        if positions <= self.capacity:
            return
        capacity = max(positions, min(self.context, max(MIN_CAPACITY, 1 << (positions - 1).bit_length())))
        grown = []
        for shape, buffer in zip(self.shapes, self.buffers):
            new = np.zeros((*shape[:2], capacity, *shape[3:]), self.dtype)
            new[:, :, :buffer.shape[2]] = buffer
            grown.append(new)
        self.buffers, self.bindings = tuple(grown), {}

    def run(self, session: ort.InferenceSession, hidden: np.ndarray, step: dict):
        new = hidden.shape[1]
        self.reserve(int(step[LENGTHS[6]]))
        key = (id(session), new)
        binding = self.bindings.get(key) or StepBinding(session, hidden, step, self.buffers)
        if new <= KEPT_STEP_LENGTH:  # (a prefill's would hold its outputs' memory)
            self.bindings[key] = binding
        return binding.run(hidden), None

    def keep(self, presents) -> None:
        pass  # already written

    def truncate(self, length: int) -> None:
        pass  # positions past the length are never read


class StepBinding:
    """A session's ONNX Runtime I/O binding for steps of one length. Python between two runs is
    slow here (the pool's threads still spin on the cores it needs): binding every input and
    output anew each run cost more than the cache copy it saves (+85 against -76 us a layer,
    bench_runtime.py's int4 shape). So everything is bound once: the cache buffers as pasts and
    presents, the pass's step inputs (KVCache.step_inputs) by reference, and an array of its own
    as the hidden state, into which each run copies it. After its first run ONNX Runtime writes the
    outputs into the memory it gave them then: what a run returns is valid until the layer's next
    step of this length (the runner consumes it within the pass), except the routing, which
    hooks may keep and is copied."""

    def __init__(self, session: ort.InferenceSession, hidden: np.ndarray, step: dict, buffers):
        self.session, self.binding = session, session.io_binding()  # (the session outlives its id)
        self.names = [output.name for output in session.get_outputs()]
        self.hidden = np.empty_like(hidden)
        for name, array in {"hidden": self.hidden, **step}.items():  # bound by reference
            self.binding.bind_cpu_input(name, array)
        self.values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in buffers]  # views of them
        for name, value in zip(PASTS, self.values):
            self.binding.bind_ortvalue_input(name, value)
        for name in self.names:
            if name in PRESENTS:
                self.binding.bind_ortvalue_output(name, self.values[PRESENTS.index(name)])
            else:
                self.binding.bind_output(name)
        self.outputs = None  # the outputs but the presents, as views of ONNX Runtime's memory

    def run(self, hidden: np.ndarray) -> list[np.ndarray]:
        np.copyto(self.hidden, hidden)
        self.session.run_with_iobinding(self.binding)
        if self.outputs is None:
            self.outputs = [value.numpy() for name, value in zip(self.names, self.binding.get_outputs())
                            if name not in PRESENTS]
            self.routing = [index for index, name in enumerate(n for n in self.names if n not in PRESENTS)
                            if name == "topk_ids"]
        outputs = list(self.outputs)
        for index in self.routing:
            outputs[index] = outputs[index].copy()
        return outputs


class KVCache:
    """The layers' caches and the ids whose positions they hold (their length)."""

    def __init__(self, layers: list):
        self.layers, self.tokens = layers, []
        self.steps: dict[int, dict[str, np.ndarray]] = {}  # step_inputs' arrays, by step length

    @property
    def length(self) -> int:
        return len(self.tokens)

    def step_inputs(self, cos: np.ndarray, sin: np.ndarray, new: int) -> dict[str, np.ndarray]:
        """What every layer of a pass of `new` positions reads alike: the rotary embedding and,
        for in-place layers, the lengths. The same arrays each pass of a kept length, since
        StepBindings read them by reference."""
        step = self.steps.get(new) or {"rope_cos": np.empty_like(cos), "rope_sin": np.empty_like(sin),
                                        LENGTHS[5]: np.zeros([1], np.int32), LENGTHS[6]: np.zeros([], np.int32)}
        if new <= KEPT_STEP_LENGTH:
            self.steps[new] = step
        np.copyto(step["rope_cos"], cos)
        np.copyto(step["rope_sin"], sin)
        step[LENGTHS[5]][0] = self.length + new - 1  # batch 1: the last position's index
        step[LENGTHS[6]][()] = self.length + new
        return step

    def keep(self, states: list, tokens: list[int]) -> None:
        """Commits a pass over every layer that fed `tokens`."""
        for layer, state in zip(self.layers, states):
            layer.keep(state)
        self.tokens = self.tokens + tokens

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)
        del self.tokens[length:]
