"""Trunk graphs: everything of a model except its routed experts, as small ONNX graphs.

Each graph wraps the model's own torch modules (attention, norms, router, shared experts), so
the exported computation is exactly the model's. We export small wrappers rather than the whole
model because the KV cache must be explicit tensors and the routed experts must be cut out.

Graphs and their interfaces (batch is always 1; T new tokens, P cached positions):
  embed:  input_ids[1,T] int64, position_ids[1,T] int64 -> hidden[1,T,H], rope_cos, rope_sin
          (a complex rotary embedding travels as its real and imaginary parts)
  layer:  hidden[1,T,H], rope_cos, rope_sin, past_* -> (dense)  hidden_out[1,T,H], present_*
                                           -> (moe)    residual[1,T,H], moe_input[T,H],
                                                       topk_ids[T,k] int64, topk_weights[T,k],
                                                       router_logits[T,E], present_*
          where for MoE layers residual already holds the attention residual plus the shared
          experts, so the runtime only adds the weighted routed-expert outputs. moe_input is
          the routed experts' input: the normed hidden state, or for a router that scales the
          input (Llama 4) that state times the top-1 weight, with topk_weights then 1.
          router_logits are the router's raw scores of every expert: a self-drafting runtime
          ranks the experts it holds by them to stand in for one it does not.
  post_experts (post-norm families only, one per MoE layer):
          residual[1,T,H], routed[1,T,H] -> hidden_out[1,T,H], the residual plus the layer's norm
          of the weighted routed-expert sum (a norm is not linear, so it cannot be folded into
          the next graph's input)
  head:   hidden[1,T,H] -> logits[1,T,V]
"""

from __future__ import annotations

import functools
import io
import warnings
from contextlib import contextmanager, nullcontext, redirect_stdout

import onnx
import torch
from torch import nn

from spac.ops.expert_graph import OPSET

from .attention import NAME as GROUPED_ATTENTION
from .attention import ONNX_TRANSLATIONS, RealComplex, deferred_cache, real_rotary
from .checkpoint import StreamedModel
from .families import Family
from .fusion import fuse_rms_norms, fuse_rotary_embeddings, fuse_sibling_matmuls
from .quantize import fake_quantize_linears, head_linears, layer_linears, quantize_graph_matmuls
from .stamping import make_template, structure_key

# Opset 20 runs on ONNX Runtime >= 1.20 (JetPack 6). Opset 23's fused Attention and
# RMSNormalization nodes decoded no faster here (A/B in bench_runtime: 0.99-1.00x), and their
# kernels need ORT >= 1.23 (Attention on the CUDA EP later still). The contrib
# GroupQueryAttention the exporter uses instead (attention.py) runs on ORT >= 1.20's CPU EP.
INLINE_WEIGHTS_LIMIT = 2**31 - 2**26  # bytes of weights a graph file holds inside (protobuf's cap, less room)
NEW_TOKENS, PAST = torch.export.Dim("new_tokens", min=1, max=4096), torch.export.Dim("past", min=0, max=65536)


class ExplicitKV:
    """Stands in for a transformers Cache: concatenates the past tensors given as graph inputs
    with this step's tensors and keeps the result as the graph's present outputs. With no past
    it only records this step's tensors (used to learn the cache shapes). `deferred`: update
    returns this step's tensors as they are, and the attention function concatenates the cache
    in its fused node (attention.deferred_cache) and sets `present`."""

    def __init__(self, past: tuple[torch.Tensor, torch.Tensor] | None, deferred: bool = False):
        self.past, self.deferred = past, deferred
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None

    def get_seq_length(self, layer_idx: int = 0):
        """Cached positions (Llama 4's attention temperature grows with them)."""
        return 0 if self.past is None else self.past[0].shape[2]

    def update(self, first, second, layer_idx, *args, **kwargs):
        if self.deferred:
            return first, second
        if self.past is None:
            self.present = (first, second)
        else:
            self.present = (torch.cat([self.past[0], first], dim=2), torch.cat([self.past[1], second], dim=2))
        return self.present


def causal_mask(past_len, new_len, window: int | None, dtype, chunk: int | None = None) -> torch.Tensor:
    """Additive mask [1,1,T,P+T]: a query at absolute position q sees keys k <= q, with a sliding
    window only k > q - window (transformers' sliding_window_overlay), and in chunks only keys
    of its own chunk (chunked_overlay)."""
    q = torch.arange(new_len) + past_len
    k = torch.arange(past_len + new_len)
    allowed = k[None, :] <= q[:, None]
    if window is not None:
        allowed = allowed & (k[None, :] > q[:, None] - window)
    if chunk is not None:
        allowed = allowed & (k[None, :] // chunk == q[:, None] // chunk)
    zero = torch.zeros((), dtype=dtype)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, blocked)[None, None]


class EmbedGraph(nn.Module):
    def __init__(self, family: Family, model):
        super().__init__()
        self.complex_rotary = family.complex_rotary_heads_axis is not None
        self.embed_tokens = model.model.embed_tokens
        self.rotary_emb = model.model.rotary_emb

    def forward(self, input_ids, position_ids):
        hidden = self.embed_tokens(input_ids)
        rotary = self.rotary_emb(hidden, position_ids)
        if self.complex_rotary:  # ONNX has no complex tensors
            return hidden, rotary.real, rotary.imag
        return hidden, *rotary


class LayerGraph(nn.Module):
    """One decoder layer without its routed experts. It holds only the modules it runs, so the
    experts' weights never enter the trunk graph."""

    def __init__(self, family: Family, model, index: int):
        super().__init__()
        layer = model.model.layers[index]
        self.index = index
        self.family = family
        self.window = family.sliding_window(model.config, index)
        self.chunk = family.attention_chunk(model.config, index)
        self.rotary_heads_axis = family.complex_rotary_heads_axis
        self.is_moe = family.is_moe_layer(layer)
        self.post_norms = family.post_norms
        self.attention_function = model.config._attn_implementation
        self.fused_attention = False  # set by export_layer once the cache's shapes are known (fuses_attention)
        # Pre-norm layers normalise what enters attention and the MLP; post-norm layers what
        # leaves them (OLMo-2).
        self.input_layernorm = nn.Identity() if self.post_norms else layer.input_layernorm
        self.self_attn = layer.self_attn
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.post_feedforward_layernorm = layer.post_feedforward_layernorm if self.post_norms else nn.Identity()
        mlp = family.mlp_of(layer)
        if self.is_moe:
            self.router = family.router_of(mlp)
            self.shared = family.shared_modules(mlp)
        else:
            self.mlp = mlp

    def attend(self, hidden, cos, sin, cache: ExplicitKV, mask=None):
        rotary = (cos, sin) if self.rotary_heads_axis is None else RealComplex(cos, sin, self.rotary_heads_axis)
        with deferred_cache(self.self_attn, cache) if cache.deferred else nullcontext():
            attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden), position_embeddings=rotary,
                                     attention_mask=mask, cache=cache)
        if self.post_norms:
            return hidden + self.post_attention_layernorm(attn)
        return hidden + attn

    def fuses_attention(self, kv_shapes: list[list[int]], dtype: torch.dtype) -> bool:
        """Whether this layer's attention, mask and cache concat can be one GroupQueryAttention
        node (attention.py): spac's grouped attention in float32 under a plain causal mask, over
        a key and value cache of one shape (not MLA's compressed one)."""
        return (self.attention_function == GROUPED_ATTENTION and dtype == torch.float32 and self.window is None
                and self.chunk is None and kv_shapes[0] == kv_shapes[1])

    def forward(self, hidden, cos, sin, past_first, past_second):
        cache = ExplicitKV((past_first, past_second), deferred=self.fused_attention)
        mask = causal_mask(past_first.shape[2], hidden.shape[1], self.window, hidden.dtype, self.chunk)
        residual = self.attend(hidden, cos, sin, cache, mask)
        moe_input = residual if self.post_norms else self.post_attention_layernorm(residual)
        if not self.is_moe:
            return (residual + self.post_feedforward_layernorm(self.mlp(moe_input)), *cache.present)
        flat = moe_input.reshape(-1, moe_input.shape[-1])
        routed_input, topk_ids, topk_weights, router_logits = self.family.route(self.router, flat)
        if self.shared:  # (an add of zeros would cost a decode step four nodes)
            residual = residual + self.family.shared_output(self.shared, flat).reshape(residual.shape)
        return (residual, routed_input, topk_ids.to(torch.int64), topk_weights.to(hidden.dtype),
                router_logits.to(hidden.dtype), *cache.present)


class PostExpertsGraph(nn.Module):
    """A post-norm MoE layer's end: the residual plus the norm of the routed experts' sum."""

    def __init__(self, layer_graph: LayerGraph):
        super().__init__()
        self.norm = layer_graph.post_feedforward_layernorm

    def forward(self, residual, routed):
        return residual + self.norm(routed)


class HeadGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def forward(self, hidden):
        return self.lm_head(self.norm(hidden))


def kv_shapes(layer_graph: LayerGraph, hidden, cos, sin) -> list[list[int]]:
    """Shapes [1, heads, 0, dim] of a layer's two cache tensors, found by running it on one token."""
    recorder = ExplicitKV(None)
    with torch.no_grad():
        layer_graph.attend(hidden, cos, sin, recorder)
    return [[1, t.shape[1], 0, t.shape[3]] for t in recorder.present]


try:  # torch.onnx's own (private) registry of op translations: see one_translation_registry
    from torch.onnx._internal.exporter._registration import ONNXRegistry
    BUILD_REGISTRY = ONNXRegistry.from_torchlib
except ImportError:  # another torch: every export builds its own, as torch.onnx does by itself
    ONNXRegistry = BUILD_REGISTRY = None


@functools.cache
def translation_registry(opset_version: int):
    """torchlib's op translations and ours (ONNX_TRANSLATIONS), built once a process."""
    registry = BUILD_REGISTRY(opset_version=opset_version)
    for op, translation in ONNX_TRANSLATIONS.items():
        registry.register_op(op, translation, is_complex=False)
    return registry


@contextmanager
def one_translation_registry():
    """torch.onnx.export rebuilds onnxscript's registry of op translations on every call: about
    1.3 s of CPU on 2 cores, a third of the export of a small model, whose package is a few
    traced graphs. Inside this block every export is handed the one translation_registry (the
    exporter reads it and never changes it)."""
    own = ONNXRegistry.__dict__["from_torchlib"]
    ONNXRegistry.from_torchlib = classmethod(lambda cls, opset_version: translation_registry(opset_version))
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = own


def trace_graph(module: nn.Module, args: tuple, input_names, output_names, dynamic_shapes) -> onnx.ModelProto:
    """torch.onnx dynamo export of one wrapper module, its RMS norms and rotary embeddings fused
    (see fusion.py)."""
    shared = ONNXRegistry is not None
    with (torch.no_grad(), warnings.catch_warnings(), redirect_stdout(io.StringIO()),
          one_translation_registry() if shared else nullcontext()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
            custom_translation_table=None if shared else ONNX_TRANSLATIONS,
        )
    fuse_rms_norms(program.model)
    fuse_rotary_embeddings(program.model)
    model = program.model_proto
    drop_exporter_metadata(model)
    return model


def drop_exporter_metadata(model: onnx.ModelProto) -> None:
    """torch.onnx keeps its bookkeeping in the graph: per node the Python stack that made it (file
    paths of the exporting machine), module and FX names, per value its original name. Nothing
    reads it, and a package handed to someone else should not tell where its exporter's files
    live."""
    graph = model.graph
    for item in (model, graph, *graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer):
        del item.metadata_props[:]
    for node in graph.node:
        node.doc_string = ""


def save_graph(model: onnx.ModelProto, path, quantization=None) -> None:
    """Fuse sibling projections (see fusion.py), store the weights that fake quantization put on
    `quantization`'s grid as MatMulNBits (see quantize.py), and write the graph: weights inside,
    or beside it past protobuf's 2 GB cap."""
    fuse_sibling_matmuls(model)
    if quantization is not None:
        quantize_graph_matmuls(model, quantization)
    # Protobuf caps a file at 2 GB: a bigger graph keeps its weights in a file beside it, as
    # torch.onnx's own save does (the manifest lists every file of the package).
    large = sum(len(tensor.raw_data) for tensor in model.graph.initializer) > INLINE_WEIGHTS_LIMIT
    onnx.save(model, str(path), save_as_external_data=large, location=f"{path.name}.data")


def export_graph(module: nn.Module, args: tuple, input_names, output_names, dynamic_shapes, path,
                 quantization=None) -> None:
    save_graph(trace_graph(module, args, input_names, output_names, dynamic_shapes), path, quantization)


def export_trunk(family: Family, source: StreamedModel, out_dir, progress, quantization=None) -> dict:
    """Export embed, every layer and head of `source` into out_dir, filling one part of the model
    at a time; returns the manifest section. `quantization`: the BlockQuantization of the trunk's
    linears (spac.export.quantize), fake-quantized in each part as it is filled, then stored as
    MatMulNBits."""
    model = source.model
    # Distinct example tensors: the exporter aliases inputs given as the same tensor object.
    example_ids, example_positions = torch.tensor([[7, 3, 5]]), torch.arange(3)[None]
    with source.part("model.embed_tokens."):
        embed = EmbedGraph(family, model)
        export_graph(embed, (example_ids, example_positions), ["input_ids", "position_ids"],
                     ["hidden", "rope_cos", "rope_sin"], {"input_ids": {1: NEW_TOKENS}, "position_ids": {1: NEW_TOKENS}},
                     out_dir / "embed.onnx")
        with torch.no_grad():
            _, cos, sin = embed(example_ids, example_positions)
            one_token = embed(example_ids[:, :1], example_positions[:, :1])
    rotary = nullcontext() if not embed.complex_rotary else real_rotary(model.model.layers[0].self_attn)
    templates = {}
    with rotary:
        layers = []
        for index in range(model.config.num_hidden_layers):
            with source.part(f"model.layers.{index}."):
                layer = model.model.layers[index]
                if quantization:
                    fake_quantize_linears(layer_linears(family, layer, index), quantization)
                layers.append(export_layer(LayerGraph(family, model, index), one_token, cos, sin, out_dir, templates,
                                           quantization))
            progress(f"layer {index}")
    with source.part("model.norm.", "lm_head."):
        if quantization:
            fake_quantize_linears(head_linears(model), quantization)
        export_graph(HeadGraph(model), (torch.zeros(1, 3, model.config.hidden_size, dtype=source.dtype),), ["hidden"],
                     ["logits"], {"hidden": {1: NEW_TOKENS}}, out_dir / "head.onnx", quantization)
    return {"embed": "embed.onnx", "head": "head.onnx", "layers": layers}


def export_layer(layer_graph: LayerGraph, one_token, cos, sin, out_dir, templates: dict, quantization=None) -> dict:
    """Write one layer's graphs, each stamped from the template of its structure; returns the
    layer's manifest entry."""
    shapes = kv_shapes(layer_graph, *one_token)
    dtype = one_token[0].dtype
    layer_graph.fused_attention = layer_graph.fuses_attention(shapes, dtype)
    past = tuple(torch.zeros(s[0], s[1], 2, s[3], dtype=dtype) for s in shapes)
    hidden = torch.zeros(1, 3, one_token[0].shape[-1], dtype=dtype)
    outputs = (["residual", "moe_input", "topk_ids", "topk_weights", "router_logits"] if layer_graph.is_moe
               else ["hidden_out"])
    dyn = {"hidden": {1: NEW_TOKENS}, "cos": {1: NEW_TOKENS}, "sin": {1: NEW_TOKENS}, "past_first": {2: PAST},
           "past_second": {2: PAST}}

    def trace(module):
        return trace_graph(module, (hidden, cos, sin, *past), ["hidden", "rope_cos", "rope_sin", "past_first",
                                                                "past_second"],
                           [*outputs, "present_first", "present_second"], dyn)

    file = f"layer_{layer_graph.index:03d}.onnx"
    write_stamped(layer_graph, trace, templates, out_dir / file, quantization)
    entry = {"index": layer_graph.index, "kind": "moe" if layer_graph.is_moe else "dense", "file": file,
             "sliding_window": layer_graph.window, "kv_shapes": shapes}
    if layer_graph.is_moe and layer_graph.post_norms:
        entry["post_experts"] = f"layer_{layer_graph.index:03d}_post.onnx"
        write_stamped(PostExpertsGraph(layer_graph), lambda module: trace_graph(
            module, (hidden, hidden.clone()), ["residual", "routed"], ["hidden_out"],
            {"residual": {1: NEW_TOKENS}, "routed": {1: NEW_TOKENS}}), templates, out_dir / entry["post_experts"])
    return entry


def write_stamped(module: nn.Module, trace, templates: dict, path, quantization=None) -> None:
    """Write `module`'s graph, stamped from the template of its structure (`trace(module)` on
    the structure's first use; traced each time if its weights cannot be stamped). Stamping
    writes the module's (fake-quantized) weights, so `quantization` applies to the stamped graph."""
    key = structure_key(module)
    if key not in templates:
        templates[key] = make_template(module, trace)
    template = templates[key]
    save_graph(template.stamp(module) if template else trace(module), path, quantization)
