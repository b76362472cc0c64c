"""The attention function trunk graphs are exported with: scaled-dot-product attention that
reads each key/value head once however many query heads share it.

transformers' own attention repeats the cache for every query head of a group (`repeat_kv`):
exported, that is two Expand nodes copying the whole cache G times on every decode step, the
costliest non-matmul nodes of a layer and growing with the context. Here each group's query
heads are folded into the sequence axis instead, so the attention matmuls read the cache as it
is (70-120 us less per decode layer of the bench_runtime model at 40-80 cached positions).

Models with attention sinks (GPT-OSS) keep transformers' "eager" attention (see families.py).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

NAME = "spac_grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, S, D] -> ([B, T, H, Dv], None), as transformers'
    attention functions. Query head h reads key/value head h // (H / Hkv), as `repeat_kv` has it."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{NAME} supports neither softcap nor attention sinks; use 'eager'")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # [B, Hkv*G, T, D] -> [B, Hkv, G*T, D]: row g*T + t is query head (kv, g) at position t.
    query = query.reshape(batch, kv_heads, groups * length, dim)
    if attention_mask is None and length > 1 and getattr(module, "is_causal", True):
        # transformers leaves the mask out when plain causal attention is meant (the model's own
        # forward; the trunk graphs always pass one): spell it out, as its sdpa's is_causal does.
        key, value = key[:, :, :length], value[:, :, :length]
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None:  # [B, 1, T, S] -> [B, 1, G*T, S], the same rows per group
        attention_mask = attention_mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa)
