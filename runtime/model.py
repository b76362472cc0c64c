"""One exported model (target or draft) as ONNX Runtime sessions plus its KV cache.

`forward(tokens)` feeds new tokens after the cached ones and returns their logits; `truncate(n)`
rolls the cache back to its first n positions (speculative decoding's rejection, or a chat turn
that shares only part of the cached conversation). `tokens` are the ids the cache holds.
"""

from __future__ import annotations

import numpy as np

from spac.ops.expert_graph import DTYPES
from spac.ops.sessions import SessionFactory

from .manifest import Manifest, ModelSection


class ModelRunner:
    def __init__(self, manifest: Manifest, section: ModelSection, sessions: SessionFactory, experts=None,
                 on_routing=None, provider: str = "cpu"):
        """`experts` runs a MoE layer's routed experts (spac.ops); `on_routing(layer, topk_ids)` sees
        every MoE layer's routing before its experts run (the pager's lookahead hook)."""
        root = manifest.root
        self.section = section
        self.dtype = DTYPES[manifest.dtype][0]
        self.embed = sessions.create(root / section.embed, provider)
        self.head = sessions.create(root / section.head, provider)
        self.layers = [sessions.create(root / layer.file, provider) for layer in section.layers]
        self.experts = experts
        self.on_routing = on_routing
        self.max_positions = section.dims["max_position_embeddings"]
        moe = [layer.index for layer in section.layers if layer.kind == "moe"]
        self.next_moe = {here: later for here, later in zip(moe, moe[1:])}  # for the lookahead
        self.reset()

    def reset(self) -> None:
        self.cache = [tuple(np.zeros(shape, self.dtype) for shape in layer.kv_shapes) for layer in self.section.layers]
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return self.cache[0][0].shape[2]

    def forward(self, tokens) -> np.ndarray:
        """Logits [T, V] for `tokens` placed after the cached positions; the cache grows by T."""
        ids = np.asarray(tokens, dtype=np.int64)[None]
        positions = np.arange(self.length, self.length + ids.shape[1], dtype=np.int64)[None]
        hidden, cos, sin = self.embed.run(None, {"input_ids": ids, "position_ids": positions})
        # The cache changes only once every layer has run: an error or Ctrl-C mid-pass leaves it
        # whole, so the next generation can still reuse it.
        cache = list(self.cache)
        anticipate = getattr(self.experts, "anticipate", None)  # the pager's cross-layer lookahead
        for index, (layer, session) in enumerate(zip(self.section.layers, self.layers)):
            past_first, past_second = cache[index]
            feeds = {"hidden": hidden, "rope_cos": cos, "rope_sin": sin, "past_first": past_first, "past_second": past_second}
            if layer.kind == "dense":
                hidden, *present = session.run(None, feeds)
            else:
                if anticipate:  # its reads start while its attention runs
                    anticipate(layer.index, hidden[0], 0)
                residual, moe_input, topk_ids, topk_weights, *present = session.run(None, feeds)
                if anticipate and layer.index in self.next_moe:  # and the next layer's, while this one's experts run
                    anticipate(self.next_moe[layer.index], residual[0], 1)
                if self.on_routing:
                    self.on_routing(layer.index, topk_ids)
                hidden = residual + self.experts.run(layer.index, moe_input, topk_ids, topk_weights)[None]
            cache[index] = tuple(present)
        logits = self.head.run(None, {"hidden": hidden})[0][0]
        self.cache, self.tokens = cache, self.tokens + ids[0].tolist()
        return logits

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.cache = [(first[:, :, :length], second[:, :, :length]) for first, second in self.cache]
            del self.tokens[length:]
