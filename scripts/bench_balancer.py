"""Benchmark the heterogeneous workload balancer on Qwen3-30B-A3B's shape.

48 layers × 128 experts, top-8, γ = 8 (9 tokens verified per round), bf16 experts of
3 × 2048 × 768 × 2 bytes, costs from a device profile (default rtx4090-desktop), routing drawn
from a Zipf-like popularity per layer that drifts from round to round. Each round:

1. the expected counts (an exponential average of past rounds, what the estimator's utilities
   stand for), the resident sets (each layer's slots hold its highest-utility experts) and the
   free slots (slots holding experts expected to get under ``--cold-below`` tokens) are
   submitted; the solve runs in the background while
   the modelled draft sleeps (``--draft-ms``);
2. the round's actual routing is drawn and every layer asks ``plan_for`` for its plan, then
   works for the plan's predicted makespan (sleeping, as while ONNX Runtime or the GPU runs; or
   spinning with ``--compute spin``).

Reported: background solve time per round (p50/p90/p99); predicted makespan of the balancer's
plans against the published code's fixed-threshold rule (GPU when resident or when the token
count ≥ τ, for every τ) and the greedy plan alone, all on the same inputs; an offline MIP on the
actual routing as the lower bound; and the share of the verify pass's critical path that
``plan_for`` takes, plus how much later the modelled layers end than in the same loop with the
greedy-only balancer (what the solver process costs the runtime by competing for the cores).

    python scripts/bench_balancer.py --rounds 30 --out results/bench_balancer.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from spac.runtime.balancer import (Balancer, Costs, LayerInput, RoundInput, greedy_layer,
                                   layer_time, solve_round_mip)
from spac.runtime.profile import load_profile

QWEN3_EXPERT_BYTES = 3 * 2048 * 768 * 2  # gate, up, down projections in bf16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="rtx4090-desktop")
    p.add_argument("--solver", choices=["CBC", "HiGHS"], help="override the profile's solver")
    p.add_argument("--time-limit-ms", type=float, help="override the profile's time limit")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup-rounds", type=int, default=10, help="rounds to fill the averages")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--draft-len", type=int, default=8, help="γ; a round verifies γ + 1 tokens")
    p.add_argument("--expert-bytes", type=int, default=QWEN3_EXPERT_BYTES)
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent per layer")
    p.add_argument("--drift", type=float, default=0.3, help="per-round popularity noise")
    p.add_argument("--cold-below", type=float, default=1.0,
                   help="a resident expert expected to get fewer tokens frees its slot")
    p.add_argument("--draft-ms", type=float, default=80.0, help="modelled draft time per round")
    p.add_argument("--compute", choices=["sleep", "spin"], default="sleep",
                   help="model a layer's expert work by sleeping (the core idles, caches cool, "
                        "as while waiting on a GPU) or by spinning (the core stays hot)")
    p.add_argument("--oracle-limit-ms", type=float, default=2000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_balancer.json")
    return p.parse_args(argv)


class Workload:
    """Synthetic routing and the utility state the runtime would hand the balancer."""

    def __init__(self, args, slots_per_layer: int):
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        ranks = np.arange(1, args.experts + 1)
        self.logits = np.stack([-args.zipf * np.log(ranks)[self.rng.permutation(args.experts)]
                                for _ in range(args.layers)])
        self.average = np.zeros((args.layers, args.experts))
        self.slots = slots_per_layer

    def route(self) -> np.ndarray:
        """Tokens per (layer, expert) for one verification round."""
        a = self.args
        tokens = a.draft_len + 1
        self.logits += self.rng.normal(0.0, a.drift, self.logits.shape)
        noisy = self.logits[:, None, :] + self.rng.gumbel(size=(a.layers, tokens, a.experts))
        top = np.argpartition(-noisy, a.top_k, axis=2)[:, :, :a.top_k]
        counts = np.zeros((a.layers, a.experts))
        for l in range(a.layers):
            counts[l] = np.bincount(top[l].ravel(), minlength=a.experts)
        return counts

    def update(self, counts: np.ndarray) -> None:
        self.average = 0.5 * self.average + 0.5 * counts

    def state(self) -> tuple[np.ndarray, list[frozenset[int]], int]:
        """Expected counts, resident sets (top utilities) and free slots (cold residents)."""
        order = np.argsort(-self.average, axis=1)[:, :self.slots]
        resident = [frozenset(row.tolist()) for row in order]
        cold = int(sum((self.average[l, row] < self.args.cold_below).sum()
                       for l, row in enumerate(order)))
        return self.average.copy(), resident, cold


def threshold_gpu(layer: LayerInput, tau: float, free: int) -> set[int]:
    """The published rule: on the GPU when resident, or fetched when the count reaches τ."""
    fetch = [e for e, n in layer.counts.items() if n >= tau and e not in layer.resident]
    return (set(layer.counts) & layer.resident) | set(fetch[:free])


def percentiles(values: list[float]) -> dict[str, float]:
    q = np.percentile(values, [50, 90, 99]) if values else [float("nan")] * 3
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "mean": float(np.mean(values)) if values else float("nan")}


def run(args, profile, with_oracle: bool) -> dict:
    costs = Costs(profile, args.expert_bytes)
    total_bytes = args.layers * args.experts * args.expert_bytes
    device = profile.budget_bytes("device", total_bytes) or total_bytes
    slots_per_layer = device // args.expert_bytes // args.layers
    work = Workload(args, slots_per_layer)
    for _ in range(args.warmup_rounds):
        work.update(work.route())
    taus = list(range(1, args.draft_len + 2)) + [float("inf")]
    totals = {"balancer": 0.0, "greedy": 0.0, "oracle": 0.0, **{f"tau={t}": 0.0 for t in taus}}
    solve_ms, plan_us, oversleep_us, verify_ms = [], [], [], []
    sources = {"mip": 0, "greedy": 0, "not ready": 0}

    with Balancer(profile, args.layers, args.experts, args.expert_bytes) as balancer:
        balancer.submit(*work.state())  # warm-up: loads the solver library (0.1–0.7 s)
        balancer.wait(timeout=30.0)
        for _ in range(args.rounds):
            expected, resident, free = work.state()
            balancer.submit(expected, resident, free, window_ms=args.draft_ms)
            time.sleep(args.draft_ms / 1000)  # the draft runs; the solve with it
            solved = balancer.solved_plan()
            sources[solved.source if solved else "not ready"] += 1
            actual = work.route()
            inputs = {l: LayerInput({e: float(actual[l, e]) for e in np.flatnonzero(actual[l])},
                                    resident[l]) for l in range(args.layers)}
            free_left, round_ms = free, 0.0
            for l in range(args.layers):
                began = time.perf_counter()
                plan = balancer.plan_for(l, actual[l], resident[l], free_left)
                plan_us.append((time.perf_counter() - began) * 1e6)
                free_left -= len(plan.fetch)
                ms = layer_time(costs, inputs[l], plan.gpu)
                round_ms += ms
                oversleep_us.append(model_compute(ms, args.compute))
            verify_ms.append(round_ms)
            totals["balancer"] += round_ms
            finished = balancer.wait(timeout=10.0)
            if finished is not None:
                solve_ms.append(finished.solve_ms)
            compare_baselines(costs, inputs, free, taus, totals)
            if with_oracle:
                oracle = solve_round_mip(costs, RoundInput(inputs, free, args.draft_ms),
                                         profile.balancer.solver, args.oracle_limit_ms)
                totals["oracle"] += sum(layer_time(costs, inputs[l], oracle[l].gpu)
                                        for l in inputs)
            work.update(actual)
    return {"totals_ms": totals, "solve_ms": solve_ms, "plan_us": plan_us,
            "oversleep_us": oversleep_us, "verify_ms": verify_ms, "sources": sources,
            "slots_per_layer": slots_per_layer}


def model_compute(ms: float, how: str) -> float:
    """Stand in for a layer's expert work; returns how many µs late it ended."""
    began = time.perf_counter()
    end = began + ms / 1000
    if how == "sleep":
        time.sleep(ms / 1000)
    else:
        while time.perf_counter() < end:
            pass
    return (time.perf_counter() - end) * 1e6


def compare_baselines(costs, inputs, free, taus, totals) -> None:
    """Greedy alone and the threshold rule for every τ, on the same inputs."""
    free_left = free
    for l, layer in inputs.items():
        plan = greedy_layer(costs, layer, free_left)
        free_left -= len(plan.fetch)
        totals["greedy"] += layer_time(costs, layer, plan.gpu)
    for tau in taus:
        free_left = free
        for layer in inputs.values():
            gpu = threshold_gpu(layer, tau, free_left)
            free_left -= len(gpu - layer.resident)
            totals[f"tau={tau}"] += layer_time(costs, layer, gpu)


def main(argv=None) -> None:
    args = parse_args(argv)
    profile = load_profile(args.profile)
    settings = profile.balancer
    if args.solver:
        settings = dataclasses.replace(settings, solver=args.solver)
    if args.time_limit_ms:
        settings = dataclasses.replace(settings, time_limit_ms=args.time_limit_ms)
    profile = dataclasses.replace(profile, balancer=settings)
    greedy_profile = dataclasses.replace(profile, balancer=dataclasses.replace(
        settings, solver="greedy"))

    measured = run(args, profile, with_oracle=True)
    baseline = run(args, greedy_profile, with_oracle=False)  # same routing: same seed

    totals = measured["totals_ms"]
    thresholds = {k: v for k, v in totals.items() if k.startswith("tau=")}
    best_tau = min(thresholds, key=thresholds.get)
    verify_total = sum(measured["verify_ms"])
    plan_total_ms = sum(measured["plan_us"]) / 1000
    extra_wake_us = (statistics.mean(measured["oversleep_us"])
                     - statistics.mean(baseline["oversleep_us"]))
    result = {
        "profile": profile.name,
        "solver": settings.solver,
        "time_limit_ms": settings.time_limit_ms,
        "shape": {"layers": args.layers, "experts": args.experts, "top_k": args.top_k,
                  "tokens_per_round": args.draft_len + 1, "expert_bytes": args.expert_bytes,
                  "device_slots_per_layer": measured["slots_per_layer"]},
        "rounds": args.rounds,
        "compute_model": args.compute,
        "machine": {"cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
        "solve_ms": percentiles(measured["solve_ms"]),
        "plans_used": measured["sources"],
        "predicted_makespan_ms_per_round": {k: v / args.rounds for k, v in totals.items()},
        "ratios": {
            "best_threshold_over_balancer": thresholds[best_tau] / totals["balancer"],
            "best_threshold": best_tau,
            "greedy_over_balancer": totals["greedy"] / totals["balancer"],
            "balancer_over_oracle": totals["balancer"] / totals["oracle"],
        },
        "critical_path": {
            "plan_for_us": percentiles(measured["plan_us"]),
            "plan_for_us_greedy_only": percentiles(baseline["plan_us"]),
            "plan_for_share_of_verify": plan_total_ms / (verify_total + plan_total_ms),
            "extra_wakeup_us_per_layer": extra_wake_us,
            "extra_wakeup_share_of_verify": extra_wake_us * len(measured["plan_us"]) / 1000
            / (verify_total + plan_total_ms),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_summary(result, out)


def print_summary(r: dict, out: Path) -> None:
    s, ratios, cp = r["solve_ms"], r["ratios"], r["critical_path"]
    print(f"profile {r['profile']}, solver {r['solver']} ({r['time_limit_ms']:g} ms limit), "
          f"{r['rounds']} rounds, {r['shape']['device_slots_per_layer']} slots per layer")
    print(f"background solve per round: p50 {s['p50']:.1f} ms, p90 {s['p90']:.1f} ms, "
          f"p99 {s['p99']:.1f} ms; plans used: {r['plans_used']}")
    print("predicted makespan per round (ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in r["predicted_makespan_ms_per_round"].items()))
    print(f"best threshold ({ratios['best_threshold']}) / balancer = "
          f"{ratios['best_threshold_over_balancer']:.3f}; greedy / balancer = "
          f"{ratios['greedy_over_balancer']:.3f}; balancer / offline MIP = "
          f"{ratios['balancer_over_oracle']:.3f}")
    print(f"plan_for: p50 {cp['plan_for_us']['p50']:.0f} µs, p99 {cp['plan_for_us']['p99']:.0f} µs"
          f" = {cp['plan_for_share_of_verify']:.2%} of the verify pass (greedy-only balancer: p50 "
          f"{cp['plan_for_us_greedy_only']['p50']:.0f} µs); layers end "
          f"{cp['extra_wakeup_us_per_layer']:+.0f} µs later than with the greedy-only balancer "
          f"= {cp['extra_wakeup_share_of_verify']:+.2%}")
    m = r["machine"]
    print(f"machine: {m['cpus']} CPUs, 1-min load average {m['load_average_1min']:.1f}; "
          f"layer work modelled by {r['compute_model']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
