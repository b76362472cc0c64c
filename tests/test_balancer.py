"""The heterogeneous workload balancer: the program against brute force, greedy against the
program, plan validity, and the Balancer's fallbacks."""

import dataclasses
import logging
import random

import pytest

from spac.runtime import balancer as bal
from balancer_reference import brute_force_round, plan_violations
from spac.runtime.balancer import (Balancer, Costs, LayerInput, RoundInput, greedy_layer, greedy_round,
                                   layer_time, solve_round_mip)
from spac.runtime.profile import load_profile

EXPERT_BYTES = 9_437_184  # one Qwen3-30B-A3B expert in bf16
GPU_PROFILES = ["rtx4090-desktop", "jetson-orin-nano-8gb", "h100-budget"]


def random_round(rng: random.Random, layers: int = 2, experts: int = 8,
                 max_active: int = 4) -> RoundInput:
    inputs = {}
    for l in range(layers):
        active = rng.sample(range(experts), rng.randint(1, max_active))
        counts = {e: float(rng.randint(1, 9)) for e in active}
        resident = frozenset(e for e in range(experts) if rng.random() < 0.4)
        inputs[l] = LayerInput(counts, resident)
    return RoundInput(inputs, free_slots=rng.randint(0, 3), window_ms=rng.choice([0.0, 0.5, 5.0]))


def skewed_costs(profile_name: str) -> Costs:
    """Costs under which fetching on demand pays off, so every branch of the program is used."""
    profile = load_profile(profile_name)
    links = dataclasses.replace(profile.links, host_to_device_gbps=200.0)
    return Costs(dataclasses.replace(profile, links=links), EXPERT_BYTES)


@pytest.mark.parametrize("profile_name", GPU_PROFILES)
@pytest.mark.parametrize("fast_link", [False, True])
def test_mip_objective_equals_brute_force(profile_name, fast_link):
    costs = skewed_costs(profile_name) if fast_link else Costs(load_profile(profile_name),
                                                                EXPERT_BYTES)
    rng = random.Random(GPU_PROFILES.index(profile_name) * 2 + fast_link)
    for _ in range(12):
        inp = random_round(rng)
        solved = solve_round_mip(costs, inp)
        assert not plan_violations(inp, solved.layers)
        assert solved.objective_ms == pytest.approx(brute_force_round(costs, inp), abs=1e-9)


@pytest.mark.parametrize("profile_name", GPU_PROFILES)
def test_greedy_is_never_better_than_the_mip(profile_name):
    costs = skewed_costs(profile_name)
    rng = random.Random(7)
    for _ in range(20):
        inp = random_round(rng, layers=4, experts=16, max_active=10)
        greedy = greedy_round(costs, inp)
        solved = solve_round_mip(costs, inp, start=greedy)
        assert not plan_violations(inp, greedy.layers)
        assert greedy.objective_ms >= solved.objective_ms - 1e-9


def test_plans_respect_slots_and_the_device_budget():
    profile = load_profile("rtx4090-desktop")
    costs = skewed_costs("rtx4090-desktop")
    layers, experts = 4, 16
    total = layers * experts * EXPERT_BYTES
    budget = profile.budget_bytes("device", total)  # 17 % of the expert bytes
    slots = budget // EXPERT_BYTES
    rng = random.Random(3)
    for _ in range(10):
        inp = random_round(rng, layers=layers, experts=experts, max_active=10)
        resident_count = sum(len(layer.resident) for layer in inp.layers.values())
        inp = dataclasses.replace(inp, free_slots=max(0, slots - resident_count))
        for plan in (greedy_round(costs, inp), solve_round_mip(costs, inp)):
            assert not plan_violations(inp, plan.layers)
            moved = sum(len(p.fetch) + len(p.prefetch) for p in plan.layers.values())
            assert moved <= inp.free_slots
            if resident_count <= slots:
                assert (resident_count + moved) * EXPERT_BYTES <= budget


def test_greedy_layer_respects_free_slots_and_seeds():
    costs = skewed_costs("rtx4090-desktop")
    layer = LayerInput({e: 9.0 for e in range(6)}, frozenset())
    for free in range(4):
        assert len(greedy_layer(costs, layer, free).fetch) <= free
    seeded = greedy_layer(costs, layer, 1, seed_gpu={0, 1, 2})  # seed wants more than is free
    assert len(seeded.fetch) <= 1


def test_unified_memory_bounds_the_layer_by_dram_streaming():
    profile = load_profile("jetson-orin-nano-8gb")
    costs = Costs(profile, EXPERT_BYTES)
    layer = LayerInput({e: 1.0 for e in range(40)}, frozenset(range(40)))
    floor = 40 * EXPERT_BYTES / (profile.links.memory_gbps * 1e6)
    assert layer_time(costs, layer, set(range(40))) >= floor


def test_no_gpu_profile_gives_all_cpu_plans_without_a_solver():
    with Balancer(load_profile("cpu-only"), 2, 8, EXPERT_BYTES) as b:
        assert b._solver is None
        b.submit([[1, 0, 3, 0, 0, 0, 0, 0]] * 2, [set(), set()], free_slots=4)
        plan = b.plan_for(0, {1: 2, 5: 1}, resident={1})
    assert plan.gpu == frozenset() and plan.cpu == {1, 5} and not plan.fetch


def test_solved_plan_is_used_and_repaired_for_actual_routing():
    profile = load_profile("rtx4090-desktop")
    counts = [[9, 9, 3, 1, 0, 0, 0, 0], [0, 2, 2, 2, 2, 1, 0, 0]]
    resident = [{0}, {1, 2}]
    with Balancer(profile, 2, 8, EXPERT_BYTES) as b:
        b.submit(counts, resident, free_slots=2, window_ms=10.0)
        solved = b.wait(timeout=30)
        assert solved is not None
        same = b.plan_for(0, counts[0], resident[0], free_slots=2)
        assert same.gpu == solved[0].gpu
        other = b.plan_for(1, {4: 5, 7: 1}, resident[1])  # experts the solve did not expect
        assert other.gpu | other.cpu == {4, 7} and not other.fetch


def test_falls_back_to_greedy_and_logs_once_without_mip(monkeypatch, caplog):
    monkeypatch.setattr(bal.importlib.util, "find_spec", lambda name: None)
    layer = LayerInput({0: 9.0, 1: 2.0}, frozenset({1}))
    with caplog.at_level(logging.WARNING, logger="spac.runtime.balancer"):
        with Balancer(load_profile("rtx4090-desktop"), 1, 4, EXPERT_BYTES) as b:
            b.submit([[9, 2, 0, 0]], [{1}], free_slots=1)
            plans = [b.plan_for(0, {0: 9, 1: 2}, {1}, free_slots=1) for _ in range(3)]
    assert all(p == greedy_layer(b.costs, layer, 1) for p in plans)
    assert sum("python-mip is not installed" in r.message for r in caplog.records) == 1


def test_plan_for_before_the_solve_is_ready_is_greedy(caplog):
    profile = load_profile("h100-budget")
    with Balancer(profile, 1, 4, EXPERT_BYTES) as b:
        with caplog.at_level(logging.WARNING, logger="spac.runtime.balancer"):
            plan = b.plan_for(0, {0: 3, 2: 1}, {2})  # nothing submitted yet
    layer = LayerInput({0: 3.0, 2: 1.0}, frozenset({2}))
    assert plan == greedy_layer(b.costs, layer, 0)
    assert any("no solved plan" in r.message for r in caplog.records)


def test_no_solution_in_time_gives_the_greedy_plan_and_a_warning(monkeypatch):
    profile = load_profile("rtx4090-desktop")
    costs = Costs(profile, EXPERT_BYTES)
    inp = random_round(random.Random(5), layers=3, experts=16, max_active=8)
    monkeypatch.setattr(bal, "solve_round_mip", lambda *args, **kwargs: None)
    plan, warnings = bal.plan_round(costs, profile.balancer, inp, previous=None)
    assert plan.source == "greedy"
    assert plan.objective_ms == greedy_round(costs, inp).objective_ms
    assert [reason for reason, _ in warnings] == ["nosolution"]


def test_a_dead_solver_process_leaves_the_greedy_plan(caplog):
    with caplog.at_level(logging.WARNING, logger="spac.runtime.balancer"):
        with Balancer(load_profile("rtx4090-desktop"), 1, 4, EXPERT_BYTES) as b:
            b._solver._proc.kill()
            b.wait(timeout=30)  # returns once the reader has seen the process end
            b.submit([[9, 2, 0, 0]], [{1}], free_slots=1)
            plan = b.plan_for(0, {0: 9, 1: 2}, {1}, free_slots=1)
    assert plan == greedy_layer(b.costs, LayerInput({0: 9, 1: 2}, frozenset({1})), 1)
    assert any("ended unexpectedly" in r.message for r in caplog.records)
