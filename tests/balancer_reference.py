"""References for the balancer's tests: a plan's validity and the best objective by enumeration."""

from __future__ import annotations

import itertools
import math
from typing import Mapping

from spac.runtime.balancer import Costs, LayerPlan, RoundInput, round_objective


def plan_violations(inp: RoundInput, layers: Mapping[int, LayerPlan]) -> list[str]:
    """What makes a plan invalid for ``inp`` (empty when it is valid)."""
    problems = []
    for l, layer in inp.layers.items():
        p = layers[l]
        if p.gpu | p.cpu != set(layer.counts) or p.gpu & p.cpu:
            problems.append(f"layer {l}: gpu/cpu do not partition the activated experts")
        if p.fetch != p.gpu - layer.resident:
            problems.append(f"layer {l}: fetch is not the non-resident part of gpu")
        if not set(p.prefetch) <= p.cpu - layer.resident or len(set(p.prefetch)) < len(p.prefetch):
            problems.append(f"layer {l}: prefetch must be distinct non-resident CPU experts")
    moved = sum(len(p.fetch) + len(p.prefetch) for p in layers.values())
    if moved > inp.free_slots:
        problems.append(f"{moved} experts moved into {inp.free_slots} free slots")
    return problems


def brute_force_round(costs: Costs, inp: RoundInput) -> float:
    """The best objective by enumeration (3 choices per non-resident expert)."""
    per_layer = []
    for l, layer in inp.layers.items():
        options = []
        for e in sorted(layer.counts):
            choices = ["cpu", "gpu"] if e in layer.resident else ["cpu", "gpu", "prefetch"]
            options.append([(e, c) for c in choices])
        per_layer.append((l, list(itertools.product(*options))))
    best = math.inf
    for combo in itertools.product(*(opts for _, opts in per_layer)):
        layers = {}
        for (l, _), choice in zip(per_layer, combo):
            gpu = frozenset(e for e, c in choice if c == "gpu")
            cpu = frozenset(inp.layers[l].counts.keys() - gpu)
            pre = tuple(e for e, c in choice if c == "prefetch")
            layers[l] = LayerPlan(gpu, cpu, gpu - inp.layers[l].resident, pre)
        if sum(len(p.fetch) + len(p.prefetch) for p in layers.values()) <= inp.free_slots:
            best = min(best, round_objective(costs, inp, layers))
    return best
