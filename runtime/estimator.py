"""Speculative Utility Estimators: per (layer, expert) utility from each verification round's
activation counts. The pager prefetches the highest utilities and evicts the lowest.

spac-counter  the published MoE-SpAc counter: a level s in 0..5 per expert; after each round
              with c tokens routed to the expert, c - s >= 5 -> s + 1, s - c >= 1 -> s - 1.
decayed       ours: an exponentially decayed count, u <- decay·u + c / tokens. It keeps the
              counter's memory of recent rounds, but an expert used by one token still gains
              utility (the counter needs 5 tokens in a round to climb, which top-2 routing over
              γ+1 = 5 tokens almost never gives), and it ranks experts finely instead of in 6 bins.
"""

from __future__ import annotations

import numpy as np


class SpacCounter:
    name = "spac-counter"
    LEVELS = 5

    def __init__(self, num_layers: int, num_experts: int):
        self.level = np.zeros((num_layers, num_experts), dtype=np.int64)

    def update(self, counts: np.ndarray) -> None:
        """counts[layer, expert]: tokens routed to each expert in this round's verify pass."""
        up = counts - self.level >= 5
        down = self.level - counts >= 1
        self.level = np.clip(self.level + up - down, 0, self.LEVELS)

    def utilities(self) -> np.ndarray:
        return self.level.astype(np.float64)


class DecayedCounts:
    name = "decayed"

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.7):
        self.decay = decay
        self.utility = np.zeros((num_layers, num_experts), dtype=np.float64)

    def update(self, counts: np.ndarray) -> None:
        tokens = max(int(counts.sum(axis=1).max()), 1)  # per-layer routed slots = tokens · top-k
        self.utility = self.decay * self.utility + counts / tokens

    def utilities(self) -> np.ndarray:
        return self.utility


ESTIMATORS = {cls.name: cls for cls in (SpacCounter, DecayedCounts)}


def make_estimator(name: str, num_layers: int, num_experts: int):
    try:
        return ESTIMATORS[name](num_layers, num_experts)
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; valid: {', '.join(ESTIMATORS)}") from None
