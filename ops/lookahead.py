"""Lookahead beyond the current layer: guess the next MoE layer's experts from the hidden state
the current layer already has, so that their reads start while the current layer computes.

The residual stream changes slowly from layer to layer, so the next layer's own router applied
to the current residual names most of the experts that layer will use (measured on the trained
model: the residual entering layer j gives layer j's top-2 with 81.5 % overlap through layer j's
norm and router, one layer earlier 55 %, chance 12.5 %). The router weights and the post-attention
norm weights are initializers of each exported layer graph; RMS normalisation only scales each
token's row by a positive number, which leaves its top-k unchanged, so a guess is
top-k((hidden * norm_weight) @ router.T) per token, for all γ+1 tokens of a verify pass.

A guess decides only what is read early, never what is computed: the layer's own router still
routes, so output stays exactly the same. Guesses are budgeted (a few experts per layer, the
most-voted first) and go through the cache's admission rule, so they never evict a cached
expert of higher utility. `LookaheadStats` counts how often guesses were right (since the
runtime was loaded, across generations) and `Lookahead` the bytes they read for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

NORM_SUFFIX = "post_attention_layernorm.weight"
ROUTER_SUFFIX = "router.weight"


@dataclass
class LookaheadStats:
    guessed: int = 0  # (layer, expert) guesses made
    right: int = 0  # guesses the layer then really routed to
    routed: int = 0  # experts the guessed layers really routed to

    def as_dict(self) -> dict:
        return {"guessed": self.guessed, "precision": self.right / self.guessed if self.guessed else None,
                "recall": self.right / self.routed if self.routed else None}


@dataclass
class RouterWeights:
    norm: np.ndarray  # [H]
    router: np.ndarray  # [E, H]


def load_routers(manifest) -> dict[int, RouterWeights]:
    """Each MoE layer's post-attention norm and router weights, from its graph's initializers;
    layers whose graph does not name them are left out (they are then never guessed)."""
    routers = {}
    for layer in manifest.target.layers:
        if layer.kind != "moe":
            continue
        graph = onnx.load(str(manifest.root / layer.file), load_external_data=False).graph
        found = {}
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            for suffix in (NORM_SUFFIX, ROUTER_SUFFIX):
                if tensor.name.endswith(suffix):
                    found[suffix] = numpy_helper.to_array(tensor).astype(np.float32)
        norm, router = found.get(NORM_SUFFIX), found.get(ROUTER_SUFFIX)
        if norm is not None and router is not None and router.ndim == 2 and router.shape[1] == norm.shape[0]:
            routers[layer.index] = RouterWeights(norm, router)
    return routers


BUDGETS = (3, 2)  # experts read early per guessed layer, by distance (0: from the layer's own input)


@dataclass
class Lookahead:
    routers: dict[int, RouterWeights]
    top_k: int
    budgets: tuple[int, ...] = BUDGETS
    stats: dict[int, LookaheadStats] = field(default_factory=dict)  # by distance
    pending: dict = field(default_factory=dict)  # (layer, distance) -> the experts guessed this pass
    read_early: int = 0  # guesses queued for reading (the cache may still refuse them)
    wasted_bytes: int = 0  # read early for a layer that then did not route to them

    def guess(self, layer: int, hidden: np.ndarray, distance: int) -> list[tuple[int, float]]:
        """(expert, share of the batch's routed slots) for `layer` from the hidden state
        `distance` layers before its input, most-voted first, within the distance's budget;
        [] when the layer's router is unknown."""
        weights = self.routers.get(layer)
        if weights is None:
            return []
        logits = (hidden.reshape(-1, hidden.shape[-1]) * weights.norm) @ weights.router.T
        top = np.argpartition(-logits, self.top_k - 1, axis=1)[:, :self.top_k]
        votes = np.bincount(top.reshape(-1), minlength=weights.router.shape[0])
        order = np.argsort(-votes, kind="stable")[:self.budgets[distance]]
        guesses = [(int(e), float(votes[e]) / top.size) for e in order if votes[e] > 0]
        self.pending[layer, distance] = {expert for expert, _ in guesses}
        self.stats.setdefault(distance, LookaheadStats()).guessed += len(guesses)
        return guesses

    def score(self, layer: int, routed: set[int]) -> set[int]:
        """The layer's real routing is known: count the guesses made for it; returns them all."""
        guessed = set()
        for distance in range(len(self.budgets)):
            mine = self.pending.pop((layer, distance), None)
            if mine is not None:
                stats = self.stats[distance]
                stats.right += len(mine & routed)
                stats.routed += len(routed)
                guessed |= mine
        return guessed

    def as_dict(self) -> dict:
        return {"read_early": self.read_early, "wasted_bytes": self.wasted_bytes,
                **{f"distance_{d}": stats.as_dict() for d, stats in sorted(self.stats.items())}}
