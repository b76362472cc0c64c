"""Self-drafting experts: the target model drafts for itself with the routed experts it already
holds in fast memory (device slots and the host cache), so no draft model is needed and the
draft never waits for storage (SpecMoE, Bang et al. 2026).

A routed expert that is not held is left out of the draft's sum. With `substitute` (the
default) its place goes to the next-best held experts by the router's logits, and the row's
weights are renormalised: the selected experts get the softmax of their logits, scaled to the
routed weights' total, which for a softmax router with normalised top-k (Qwen3, Mixtral) is
exactly what the router would give if only held experts existed. Without `substitute` the held
ones keep their weights, scaled up to the same total. Either way only the draft changes: the
verify pass runs the full target, so the output stays exactly the target's.

With `copies` (a stack over the package's draft copies of the experts, block-quantized to fewer
bits: spac-export --draft-experts) nothing is left out or substituted: the draft computes every
routed expert from its copy, held in memory beside the host cache. Then the draft is the target
with quantized experts, which agrees with the target far more often than a draft missing some of
its experts, and it never reads a full expert (an fp32 expert is 6-7x its int4 copy).

The experts the draft lacked are what the verify pass will need; without copies they go to the
target stack's `lookahead` as soon as the draft meets them, so the prefetcher reads them while
the draft goes on. With copies they do not: the prefetcher's reads then slowed the draft more
than they saved the verify pass (spac policy, 25 % host budget: 153-168 against 231-234 tok/s on
the trained model, the draft 16-18 against 8 ms a round; 17.4-18.5 against 19.8-21.2 tok/s on
the 18.9 MB-expert testbed, whose verify passes were faster without them too).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .experts import Experts
from .stats import DraftExpertStats


class SelfDraftExperts:
    """An `Experts` for the draft pass, over the target's own stack (`target`)."""

    policy = "self-draft"

    def __init__(self, target: Experts, num_experts: int, substitute: bool = True, copies: Experts | None = None):
        """`copies`: the draft copies' stack (the draft computes from them); None: the target's held experts."""
        self.target, self.num_experts, self.substitute, self.copies = target, num_experts, substitute, copies
        self.stats = DraftExpertStats()

    def run(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray,
            router_logits: np.ndarray | None = None) -> np.ndarray:
        held = np.zeros(self.num_experts, dtype=bool)
        held[list(self.target.resident(layer))] = True
        missing = ~held[topk_ids]
        self.stats.routed += topk_ids.size
        if missing.any():
            self.stats.substituted += int(missing.sum())
            if self.copies is None:
                self.target.lookahead(layer, np.unique(topk_ids[missing]).tolist())
                topk_ids, topk_weights = self._reroute(topk_ids, topk_weights, router_logits, held, missing)
        if self.copies is not None:
            return self.copies.run_resident(layer, x, topk_ids, topk_weights)
        return self.target.run_resident(layer, x, topk_ids, topk_weights)

    def _reroute(self, topk_ids, topk_weights, router_logits, held, missing):
        """Each row's ids and weights with only held experts (-1: an empty slot)."""
        ids = np.where(missing, -1, topk_ids)
        weights = np.where(missing, 0, topk_weights)
        totals = topk_weights.sum(axis=1)
        for row in np.flatnonzero(missing.any(axis=1)):
            if self.substitute and router_logits is not None:
                self._substitute(ids[row], router_logits[row], held)
                chosen = ids[row] >= 0
                weights[row] = 0
                if chosen.any():
                    scores = router_logits[row, ids[row][chosen]].astype(np.float64)
                    share = np.exp(scores - scores.max())
                    weights[row, chosen] = share / share.sum() * totals[row]
            elif weights[row].sum() > 0:
                weights[row] *= totals[row] / weights[row].sum()
        return ids, weights

    @staticmethod
    def _substitute(ids: np.ndarray, logits: np.ndarray, held: np.ndarray) -> None:
        """Fill the row's empty slots (-1) with the best held experts it does not use yet."""
        candidates = np.where(held, logits, -np.inf)
        candidates[ids[ids >= 0]] = -np.inf
        empty = np.flatnonzero(ids < 0)
        best = np.argsort(-candidates, kind="stable")[:len(empty)]
        best = best[np.isfinite(candidates[best])]
        ids[empty[:len(best)]] = best

    def count(self, topk_ids: np.ndarray) -> None:
        """A layer's routing that ran in a trunk graph joined to the target's resident experts
        (spac.runtime.model.ModelRunner.join_experts): every expert was held, none substituted."""
        self.stats.routed += topk_ids.size

    def resident(self, layer: int) -> set[int]:
        return self.target.resident(layer)

    def run_resident(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        return self.target.run_resident(layer, x, topk_ids, topk_weights)

    def lookahead(self, layer: int, experts: Sequence[int]) -> None:
        self.target.lookahead(layer, experts)

    def end_round(self, proposed: Sequence[int] = (), draft_seconds: float = 0.0, draft_follows: bool = True) -> None:
        """The target's stack hears the rounds; the draft has nothing to do at their end."""

    def reset_stats(self) -> None:
        self.stats = DraftExpertStats()

    def close(self) -> None:
        """The target's stack and the copies belong to their owner, who closes them."""
