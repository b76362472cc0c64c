"""One exported model (target or draft) as ONNX Runtime sessions plus its KV cache.

`forward(tokens)` feeds new tokens after the cached ones and returns their logits; `truncate(n)`
rolls the cache back to its first n positions (speculative decoding's rejection, or a chat turn
that shares only part of the cached conversation). `tokens` are the ids the cache holds.

`twin(experts)` is the same model with another expert stack, sharing the sessions and the KV
cache: self-speculative decoding drafts with it, writing the speculative positions into the
target's own cache, which the verify pass then recomputes (the decoder truncates it first).

On the CPU, a layer whose attention is one GroupQueryAttention node appends to its cache in place
(spac.runtime.kv_cache); the others, and every layer on another provider, copy it each step.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from spac.ops.expert_graph import DTYPES
from spac.ops.sessions import SessionFactory

from .kv_cache import CopiedCache, InPlaceCache, KVCache, in_place_graph
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
        self.root, self.sessions, self.provider = root, sessions, provider
        self.in_place: set[int] = set()  # layers (by position) whose cache their attention appends to
        self.layers = [self._layer_session(position, layer) for position, layer in enumerate(section.layers)]
        self.post_experts = {layer.index: sessions.create(root / layer.post_experts, provider)
                             for layer in section.layers if layer.post_experts}
        self.experts = experts
        self.on_routing = on_routing
        self.max_positions = section.dims["max_position_embeddings"]
        moe = [layer.index for layer in section.layers if layer.kind == "moe"]
        self.next_moe = {here: later for here, later in zip(moe, moe[1:])}  # for the layer lookahead
        self.kv = KVCache([InPlaceCache(layer.kv_shapes, self.dtype, self.max_positions) if position in self.in_place
                           else CopiedCache(layer.kv_shapes, self.dtype) for position, layer in enumerate(section.layers)])
        self.joined: set[int] = set()  # MoE layers whose trunk graph runs their experts too (join_experts)

    def _layer_graph(self, position: int, layer) -> onnx.ModelProto | None:
        """The layer's graph, rewritten to append to its cache in place where it can be (see
        kv_cache), or None: the CUDA provider, a graph in another form or with external data."""
        if self.provider != "cpu":
            return None
        model = onnx.load(self.root / layer.file, load_external_data=False)
        if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer):
            return None  # (a graph past protobuf's cap: loading it whole is what its file avoids)
        model = in_place_graph(model)
        if model is not None:
            self.in_place.add(position)
        return model

    def _layer_session(self, position: int, layer):
        model = self._layer_graph(position, layer)
        source = self.root / layer.file if model is None else model.SerializeToString()
        return self.sessions.create(source, self.provider)

    def join_experts(self) -> int:
        """Joins each MoE layer's trunk graph to its experts where the stack offers them as one
        graph (resident block-quantized experts on the CPU, spac.ops.fused_experts): one session
        run a layer instead of two, and the trunk's session is dropped. Post-norm layers keep
        theirs. Returns how many layers were joined."""
        take = getattr(self.experts, "take_fused", None)
        for index, layer in enumerate(self.section.layers):
            fused = take(layer.index) if take and layer.kind == "moe" and not layer.post_experts else None
            if fused is not None:
                trunk = onnx.load(self.root / layer.file)
                model = fused.joined_to(in_place_graph(trunk) if index in self.in_place else trunk)
                self.layers[index] = self.sessions.create(model.SerializeToString(), self.provider,
                                                          initializers=fused.weights)
                self.joined.add(layer.index)
        return len(self.joined)

    def twin(self, experts) -> "ModelRunner":
        """This model with `experts` as its routed experts, sharing its sessions and KV cache."""
        twin = copy.copy(self)  # the same KVCache object: what one writes, the other sees
        twin.experts, twin.on_routing = experts, None
        return twin

    def reset(self) -> None:
        self.kv.truncate(0)

    @property
    def cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer, the keys and values of the positions held."""
        return [layer.held(self.length) for layer in self.kv.layers]

    @property
    def tokens(self) -> list[int]:
        return self.kv.tokens

    @property
    def length(self) -> int:
        return self.kv.length

    def forward(self, tokens) -> np.ndarray:
        """Logits [T, V] for `tokens` placed after the cached positions; the cache grows by T."""
        ids = np.asarray(tokens, dtype=np.int64)[None]
        positions = np.arange(self.length, self.length + ids.shape[1], dtype=np.int64)[None]
        hidden, cos, sin = self.embed.run(None, {"input_ids": ids, "position_ids": positions})
        # The cache changes only once every layer has run: an error or Ctrl-C mid-pass leaves it
        # whole, so the next generation can still reuse it.
        states, step = [], self.kv.step_inputs(cos, sin, ids.shape[1])
        anticipate = getattr(self.experts, "anticipate", None)  # the pager's layer lookahead
        for layer, session, cache in zip(self.section.layers, self.layers, self.kv.layers):
            if layer.kind == "dense":
                (hidden,), state = cache.run(session, hidden, step)
            elif layer.index in self.joined:
                (hidden, topk_ids), state = cache.run(session, hidden, step)
                if self.on_routing:
                    self.on_routing(layer.index, topk_ids)
                self.experts.count(topk_ids)
            else:
                if anticipate:  # its reads start while its attention runs
                    anticipate(layer.index, hidden[0], 0)
                (residual, moe_input, topk_ids, topk_weights, router_logits), state = cache.run(session, hidden, step)
                if anticipate and layer.index in self.next_moe:  # and the next layer's, while this one's experts run
                    anticipate(self.next_moe[layer.index], residual[0], 1)
                if self.on_routing:
                    self.on_routing(layer.index, topk_ids)
                routed = self.experts.run(layer.index, moe_input, topk_ids, topk_weights, router_logits)[None]
                if layer.index in self.post_experts:
                    hidden = self.post_experts[layer.index].run(None, {"residual": residual, "routed": routed})[0]
                else:
                    hidden = residual + routed
            states.append(state)
        logits = self.head.run(None, {"hidden": hidden})[0][0]
        self.kv.keep(states, ids[0].tolist())
        return logits

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.kv.truncate(length)
