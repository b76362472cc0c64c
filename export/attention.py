"""The attention function trunk graphs are exported with: transformers' eager attention, except
that each key/value head is read once however many query heads share it.

transformers repeats the cache for every query head of a group (`repeat_kv`): exported, that is
two Expand nodes copying the whole cache G times on every decode step, the costliest non-matmul
nodes of a layer and growing with the context. Here the query heads of a group get their own
axis and the cache a broadcast one, so the matmuls read the cache as it is. The arithmetic is
eager's (scores scaled after the product, float32 softmax), so it rounds as the model does.

Models with attention sinks (GPT-OSS) keep transformers' own "eager" (see families.py).

Where a layer's cache is deferred to it (`deferred_cache`: a float32 layer with a plain causal
mask, see trunk.LayerGraph), the cache's concat, the mask and the attention become one
`group_query_attention` node, exported as ONNX Runtime's com.microsoft.GroupQueryAttention: a
decode layer of scripts/bench_runtime.py's shape has 48 nodes instead of 64 (the mask's
construction, the two cache concats, the reshapes around two matmuls and a softmax go; the
node's sequence-length inputs and layout reshapes come). Its kernel scales the product inside
the GEMM and applies the causal mask by skipping the masked keys, so its outputs differ from
eager's by float rounding only (up to ~5e-7 here). Sliding-window layers keep the eager form: ORT 1.20's
`local_window_size` attends to one key more than 1.32's and transformers'.

A complex rotary embedding (DeepSeek-V2, Llama 4) is exported in real arithmetic (`real_rotary`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset20 as op
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from spac.ops.quantization import CONTRIB_DOMAIN

NAME = "spac_grouped_eager"
DEFERRED_CACHE = "spac_deferred_cache"  # the attention module's attribute while its cache is deferred


def grouped_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, S, D], additive mask [B, 1, T, S] -> ([B, T, H, Dv],
    None), as transformers' attention functions. Query head h reads key/value head h // (H / Hkv),
    as `repeat_kv` has it. With its cache deferred (`deferred_cache`), key/value are this step's
    only: the cache is concatenated here, in one fused node with the attention."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{NAME} supports neither softcap nor attention sinks; use 'eager'")
    cache = getattr(module, DEFERRED_CACHE, None)
    if cache is not None:
        (past_key, past_value), heads = cache.past, query.shape[1]
        out, present_key, present_value = group_query_attention(query, key, value, past_key, past_value,
                                                                attention_mask, scaling)
        cache.present = (present_key, present_value)
        return out.reshape(query.shape[0], query.shape[2], heads, value.shape[-1]), None
    return _grouped(query, key, value, attention_mask, scaling), None


def _grouped(query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """grouped_attention's arithmetic, as a tensor [B, T, H, Dv]. No dropout: trunks are
    exported in eval mode, so transformers' `dropout` argument is always 0 here."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    query = query.reshape(batch, kv_heads, heads // kv_heads, length, dim)  # [B, Hkv, G, T, D]
    key, value = key[:, :, None], value[:, :, None]  # [B, Hkv, 1, S, D]: broadcast over G
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value)  # [B, Hkv, G, T, Dv]
    return out.reshape(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous()


@contextmanager
def deferred_cache(attention: torch.nn.Module, cache):
    """While it is open, `attention`'s cache (trunk.ExplicitKV, whose update then returns this
    step's key/value unconcatenated) is concatenated by grouped_attention, in one fused node."""
    setattr(attention, DEFERRED_CACHE, cache)
    try:
        yield
    finally:
        delattr(attention, DEFERRED_CACHE)


@torch.library.custom_op("spac::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, causal_mask: torch.Tensor,
                          scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [B, H, T, D], this step's key/value [B, Hkv, T, D], the cache [B, Hkv, P, D], the
    layer's plain causal mask [1, 1, T, P + T] -> (out [B, T, H * D], present key/value [B, Hkv,
    P + T, D]): attention over the cache and this step. Exported as one GroupQueryAttention node
    (group_query_attention_onnx), which masks causally by itself: only layers whose mask is the
    plain causal one are fused (trunk.LayerGraph.fuses_attention)."""
    present_key, present_value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
    out = _grouped(query, present_key, present_value, causal_mask, scaling)
    return out.reshape(query.shape[0], query.shape[2], -1), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, causal_mask, scaling):
    batch, heads, length, _ = query.shape
    total = past_key.shape[2] + length
    return (query.new_empty(batch, length, heads * value.shape[-1]), key.new_empty(batch, key.shape[1], total, key.shape[3]),
            value.new_empty(batch, value.shape[1], total, value.shape[3]))


def _register_group_query_attention_schema() -> None:
    """onnxscript builds a node only from a registered schema, and onnx ships none for ONNX
    Runtime's contrib ops: this is GroupQueryAttention's, as far as the exporter uses it."""
    if onnx.defs.has("GroupQueryAttention", CONTRIB_DOMAIN):
        return
    tensor = OpSchema.FormalParameter
    names = ("query", "key", "value", "past_key", "past_value")
    onnx.defs.register_schema(OpSchema(
        "GroupQueryAttention", CONTRIB_DOMAIN, 1,
        inputs=[tensor(name, "T") for name in names] + [tensor("seqlens_k", "M"), tensor("total_sequence_length", "M")],
        outputs=[tensor(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")]))


_register_group_query_attention_schema()
_contrib = onnxscript.values.Opset(CONTRIB_DOMAIN, 1)


def group_query_attention_onnx(query, key, value, past_key, past_value, causal_mask, scaling: float):
    """group_query_attention as GroupQueryAttention: its query and this step's key/value are
    [B, T, heads * D], the cache stays [B, Hkv, P, D]; seqlens_k is P + T - 1 for batch 1. The
    node masks causally itself, so `causal_mask` is not read and the exporter drops its nodes."""
    def tokens_first(x):
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))

    total = op.Cast(op.Add(op.Shape(past_key, start=2, end=3), op.Shape(query, start=2, end=3)), to=onnx.TensorProto.INT32)
    last_position = op.Sub(total, op.Constant(value=onnx.helper.make_tensor("one", onnx.TensorProto.INT32, [1], [1])))
    return _contrib.GroupQueryAttention(
        tokens_first(query), tokens_first(key), tokens_first(value), past_key, past_value, last_position,
        op.Squeeze(total), num_heads=query.shape[1], kv_num_heads=key.shape[1], scale=scaling)


ONNX_TRANSLATIONS = {torch.ops.spac.group_query_attention.default: group_query_attention_onnx}


AttentionInterface.register(NAME, grouped_attention)
# The model's own forward (the exporter's reference) then builds eager's additive masks too.
AttentionMaskInterface.register(NAME, eager_mask)


class RealComplex:
    """A complex rotary embedding [B, T, D/2] as its real and imaginary parts: ONNX has no complex
    tensors. `heads_axis` is where the queries given to apply_rotary_emb have their heads: 1 for
    [B, H, T, D] (DeepSeek-V2), 2 for [B, T, H, D] (Llama 4). `to` is there because both models
    move the embedding to the query's device before applying it."""

    def __init__(self, real: torch.Tensor, imag: torch.Tensor, heads_axis: int):
        self.real, self.imag, self.heads_axis = real, imag, heads_axis

    def to(self, *args, **kwargs) -> RealComplex:
        return self


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: RealComplex):
    """transformers' complex apply_rotary_emb (DeepSeek-V2, Llama 4) in real arithmetic: each pair
    of channels (a, b) is the complex number a + bi, multiplied by the embedding c + di."""
    cos, sin = freqs.real.unsqueeze(freqs.heads_axis), freqs.imag.unsqueeze(freqs.heads_axis)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


@contextmanager
def real_rotary(attention: torch.nn.Module):
    """While exporting, the attention's module applies the rotary embedding with real tensors."""
    module = sys.modules[type(attention).__module__]
    original = module.apply_rotary_emb
    module.apply_rotary_emb = apply_rotary_emb
    try:
        yield
    finally:
        module.apply_rotary_emb = original
