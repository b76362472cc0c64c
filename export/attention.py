"""The attention function trunk graphs are exported with: transformers' eager attention, except
that each key/value head is read once however many query heads share it.

transformers repeats the cache for every query head of a group (`repeat_kv`): exported, that is
two Expand nodes copying the whole cache G times on every decode step, the costliest non-matmul
nodes of a layer and growing with the context. Here the query heads of a group get their own
axis and the cache a broadcast one, so the matmuls read the cache as it is. The arithmetic is
eager's (scores scaled after the product, float32 softmax), so it rounds as the model does.

Models with attention sinks (GPT-OSS) keep transformers' own "eager" (see families.py).
"""

from __future__ import annotations

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
