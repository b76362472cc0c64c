"""The attention function trunk graphs are exported with: transformers' eager attention, except
that each key/value head is read once however many query heads share it.

transformers repeats the cache for every query head of a group (`repeat_kv`): exported, that is
two Expand nodes copying the whole cache G times on every decode step, the costliest non-matmul
nodes of a layer and growing with the context. Here the query heads of a group get their own
axis and the cache a broadcast one, so the matmuls read the cache as it is. The arithmetic is
eager's (scores scaled after the product, float32 softmax), so it rounds as the model does.

Models with attention sinks (GPT-OSS) keep transformers' own "eager" (see families.py).

A complex rotary embedding (DeepSeek-V2, Llama 4) is exported in real arithmetic (`real_rotary`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "spac_grouped_eager"


def grouped_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, S, D], additive mask [B, 1, T, S] -> ([B, T, H, Dv],
    None), as transformers' attention functions. Query head h reads key/value head h // (H / Hkv),
    as `repeat_kv` has it."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{NAME} supports neither softcap nor attention sinks; use 'eager'")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    query = query.reshape(batch, kv_heads, heads // kv_heads, length, dim)  # [B, Hkv, G, T, D]
    key, value = key[:, :, None], value[:, :, None]  # [B, Hkv, 1, S, D]: broadcast over G
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # [B, Hkv, G, T, Dv]
    return out.reshape(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous(), None


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
