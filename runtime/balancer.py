"""Heterogeneous workload balancer: which activated experts run on the GPU and which on the CPU,
what to fetch now and what to prefetch for the next round.

One verification round runs every layer once over γ + 1 tokens. For each layer the plan splits
the activated experts between the GPU (resident ones, or fetched first over the host → device
link) and the CPU (computed in place from host memory); both sides run in parallel, so a layer
takes the longer side. The whole round is one integer program (python-mip, the ``mip`` extra):

    minimise   Σ_l T_l  +  stall  −  Σ v(n)·prefetch
    T_l ≥ Σ_cpu t_cpu(n_e)                                   CPU side of layer l
    T_l ≥ Σ_gpu t_gpu(n_e) + Σ_fetched t_xfer                GPU side: fetch, then run
    T_l ≥ (|activated| + 2·|fetched|)·t_mem                  unified memory only: one DRAM
    Σ fetched + Σ prefetched ≤ free slots                    over the whole round
    stall ≥ (Σ fetched + Σ prefetched)·t_xfer − window − Σ_l T_l    link busy past the round

What it adds to a per-layer threshold rule (each layer on its own: an expert goes to the GPU
when running it there, a fetch included, is faster than on the CPU), and why:

* **One program per round**: the free slots and the link are shared by all layers, so the
  solver decides which layers get them; a per-layer rule spends them on the first layers.
* **Prefetch in the same program**: an expert left on the CPU now can be brought in behind the
  round (and the next draft, ``window``) for the next round. Its value ``v(n) = ½·(t_cpu − t_gpu)``
  is the next-round saving, halved because moving work between two balanced sides shortens the
  longer one by half of it; copies that outlast the window count as a stall.
* **Unified memory** (Jetson): CPU and GPU stream expert weights from one DRAM, so the layer
  also cannot beat the time to read every activated expert once (and copy the fetched ones).
* **Aggregation**: experts of a layer with the same token count and residency cost the same, so
  the program counts how many of each class go to the GPU (integers) instead of choosing each
  one (binaries). Same optimum, 5–10× fewer variables, and no symmetric branches for CBC.

Costs come from the profile (``a + ms_per_mb·MB + b·tokens·MB`` per provider, link bandwidths).
The program is solved per round in a background thread, warm-started from the previous round's
plan and the greedy plan, under the profile's time limit. ``Balancer.plan_for`` on the critical
path only repairs that plan for the layer's actual routing (a greedy pass seeded with it), or
runs the greedy plan alone when no solved plan is ready, the solver is missing, too slow or the
program infeasible.

A plan's ``fetch`` (GPU experts to copy in first) and ``prefetch`` (CPU experts to copy in after
the layer, for the next round) are what the program counts against the free slots and the link;
the pager copies ``prefetch`` into free device slots. ``window_ms`` is the last draft's duration.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import numpy as np

from spac.runtime.profile import BalancerSettings, Profile

log = logging.getLogger(__name__)

# Share of a prefetched expert's next-round CPU→GPU saving that counts: moving work w from the
# busier of two balanced sides to the other shortens the makespan by w/2.
PREFETCH_WEIGHT = 0.5

# Relative optimality gap at which a round's solve stops: far below the cost model's accuracy,
# and it spares CBC proving the last fraction of a percent.
SOLVER_GAP = 0.002


@dataclass(frozen=True)
class LayerPlan:
    gpu: frozenset[int]  # experts to run on the GPU execution provider
    cpu: frozenset[int]  # experts to run on the CPU execution provider, in host memory
    fetch: frozenset[int] = frozenset()  # subset of gpu not resident: bring before running
    prefetch: tuple[int, ...] = ()  # bring after this layer ran, for the next round, best first


@dataclass(frozen=True)
class RoundPlan:
    layers: Mapping[int, LayerPlan]
    objective_ms: float  # predicted Σ layer makespans + stall − prefetch value
    source: str  # "mip" or "greedy"
    solve_ms: float = 0.0

    def __getitem__(self, layer: int) -> LayerPlan:
        return self.layers[layer]


@dataclass(frozen=True)
class LayerInput:
    counts: Mapping[int, float]  # activated expert → tokens routed to it (only those > 0)
    resident: frozenset[int]  # experts of this layer already in a device slot


@dataclass(frozen=True)
class RoundInput:
    layers: Mapping[int, LayerInput]
    free_slots: int  # device slots the round may fill (fetch + prefetch)
    window_ms: float = 0.0  # link time hidden after the round, before the next needs its slots


class Costs:
    """Per-expert times of one package's experts on one profile, memoised by token count."""

    def __init__(self, profile: Profile, expert_bytes: int):
        self.expert_mb = expert_bytes / 1e6
        self.profile = profile
        self.fetch_ms = profile.transfer_ms(expert_bytes) if profile.has_gpu else math.inf
        memory_gbps = profile.links.memory_gbps
        unified = profile.memory == "unified" and memory_gbps
        self.mem_ms = expert_bytes / (memory_gbps * 1e6) if unified else 0.0
        self._cpu: dict[float, float] = {}
        self._gpu: dict[float, float] = {}

    def cpu(self, tokens: float) -> float:
        return self._lookup(self._cpu, "cpu", tokens)

    def gpu(self, tokens: float) -> float:
        return self._lookup(self._gpu, "cuda", tokens)

    def _lookup(self, table: dict[float, float], ep: str, tokens: float) -> float:
        t = table.get(tokens)
        if t is None:
            t = table[tokens] = self.profile.expert_time_ms(ep, tokens, self.expert_mb)
        return t

    def prefetch_value(self, tokens: float) -> float:
        return PREFETCH_WEIGHT * max(0.0, self.cpu(tokens) - self.gpu(tokens))

    def span(self, cpu_ms: float, gpu_ms: float, activated: int, fetched: int) -> float:
        """A layer's makespan from its two sides' loads (and the DRAM floor on unified memory)."""
        return max(cpu_ms, gpu_ms, (activated + 2 * fetched) * self.mem_ms)


# ---------------------------------------------------------------------------------------------
# Evaluating plans: the one cost model that greedy, brute force and the program share.


def layer_time(costs: Costs, layer: LayerInput, gpu: Iterable[int]) -> float:
    gpu = set(gpu)
    cpu_ms = sum(costs.cpu(n) for e, n in layer.counts.items() if e not in gpu)
    fetched = len(gpu - layer.resident)
    gpu_ms = sum(costs.gpu(layer.counts[e]) for e in gpu) + fetched * costs.fetch_ms
    return costs.span(cpu_ms, gpu_ms, len(layer.counts), fetched)


def round_objective(costs: Costs, inp: RoundInput, layers: Mapping[int, LayerPlan]) -> float:
    total = sum(layer_time(costs, inp.layers[l], p.gpu) for l, p in layers.items())
    moved = sum(len(p.fetch) + len(p.prefetch) for p in layers.values())
    stall = max(0.0, moved * costs.fetch_ms - inp.window_ms - total) if moved else 0.0
    value = sum(costs.prefetch_value(inp.layers[l].counts[e])
                for l, p in layers.items() for e in p.prefetch)
    return total + stall - value


def all_cpu_plan(counts: Mapping[int, float]) -> LayerPlan:
    return LayerPlan(gpu=frozenset(), cpu=frozenset(counts))


# ---------------------------------------------------------------------------------------------
# Greedy: the critical-path plan, the fallback and the solver's warm start.


def group_experts(layer: LayerInput) -> dict[tuple[float, bool], list[int]]:
    """(tokens, resident) → the layer's experts with them: each group's members cost the same."""
    groups: dict[tuple[float, bool], list[int]] = {}
    for e, n in layer.counts.items():
        groups.setdefault((n, e in layer.resident), []).append(e)
    return groups


class _Group:
    """Experts of one layer with the same tokens and residency (interchangeable), ``on_gpu`` of
    them on the GPU; the members a seed put on the GPU come first."""

    __slots__ = ("cpu_ms", "gpu_ms", "fetch", "members", "on_gpu")

    def __init__(self, cpu_ms: float, gpu_ms: float, fetch: bool, members: list[int], on_gpu: int):
        self.cpu_ms, self.gpu_ms, self.fetch = cpu_ms, gpu_ms, fetch
        self.members, self.on_gpu = members, on_gpu


def greedy_layer(costs: Costs, layer: LayerInput, free_slots: int,
                 seed_gpu: Iterable[int] | None = None) -> LayerPlan:
    """Balance one layer by single moves, starting from ``seed_gpu`` (default: the residents).

    While the GPU side is the longer one, experts leave it cheapest-on-CPU first (a fetched one
    also gives its slot back); then the experts that relieve the CPU most move to the GPU
    (fetching takes a free slot) while that shortens the layer. This runs on the critical path,
    so it moves groups of equal experts by count rather than expert by expert.
    """
    counts = layer.counts
    groups = []
    for (n, res), members in group_experts(layer).items():
        if seed_gpu is None:  # the residents: a group is all on the GPU or all off it
            on, off = (members, []) if res else ([], members)
        else:
            on = [e for e in members if e in seed_gpu]
            off = [e for e in members if e not in seed_gpu]
        gpu_ms = costs.gpu(n) + (0.0 if res else costs.fetch_ms)
        groups.append(_Group(costs.cpu(n), gpu_ms, not res, on + off, len(on)))

    # A seed may want more fetches than slots are free now: drop those relieving the CPU least.
    excess = sum(g.on_gpu for g in groups if g.fetch) - max(free_slots, 0)
    for g in sorted((g for g in groups if g.fetch), key=lambda g: g.cpu_ms):
        dropped = min(max(excess, 0), g.on_gpu)
        g.on_gpu -= dropped
        excess -= dropped

    cpu_ms = sum(g.cpu_ms * (len(g.members) - g.on_gpu) for g in groups)
    gpu_ms = sum(g.gpu_ms * g.on_gpu for g in groups)
    fetched = sum(g.on_gpu for g in groups if g.fetch)
    n, span = len(counts), costs.span

    for g in sorted(groups, key=lambda g: g.cpu_ms / max(g.gpu_ms, 1e-12)):
        while g.on_gpu and gpu_ms > cpu_ms and span(
                cpu_ms + g.cpu_ms, gpu_ms - g.gpu_ms, n, fetched - g.fetch) < span(
                cpu_ms, gpu_ms, n, fetched):
            g.on_gpu -= 1
            cpu_ms, gpu_ms, fetched = cpu_ms + g.cpu_ms, gpu_ms - g.gpu_ms, fetched - g.fetch

    for g in sorted(groups, key=lambda g: -g.cpu_ms):
        while g.on_gpu < len(g.members) and not (g.fetch and fetched >= free_slots) and span(
                cpu_ms - g.cpu_ms, gpu_ms + g.gpu_ms, n, fetched + g.fetch) < span(
                cpu_ms, gpu_ms, n, fetched):
            g.on_gpu += 1
            cpu_ms, gpu_ms, fetched = cpu_ms - g.cpu_ms, gpu_ms + g.gpu_ms, fetched + g.fetch

    gpu: list[int] = []
    fetch: list[int] = []
    prefetch: list[tuple[float, int]] = []
    for g in groups:
        gpu += g.members[:g.on_gpu]
        if g.fetch:
            fetch += g.members[:g.on_gpu]
            value = costs.prefetch_value(counts[g.members[0]])
            if value > 0:
                prefetch += ((-value, e) for e in g.members[g.on_gpu:])
    return LayerPlan(frozenset(gpu), frozenset(counts.keys() - set(gpu)), frozenset(fetch),
                     tuple(e for _, e in sorted(prefetch)))


def greedy_round(costs: Costs, inp: RoundInput,
                 seeds: Mapping[int, LayerPlan] | None = None) -> RoundPlan:
    """Greedy layers in order (each takes the slots it wants from what is left), then the most
    valuable prefetches across layers that the remaining slots and the window's link time hold."""
    layers, slots, total = {}, inp.free_slots, 0.0
    for l, layer in inp.layers.items():
        seed = seeds.get(l) if seeds else None
        plan = greedy_layer(costs, layer, slots, seed.gpu if seed else None)
        layers[l] = plan
        slots -= len(plan.fetch)
        total += layer_time(costs, layer, plan.gpu)

    link_ms = inp.window_ms + total - (inp.free_slots - slots) * costs.fetch_ms
    affordable = min(slots, max(0, int(link_ms // costs.fetch_ms)) if costs.fetch_ms > 0 else slots)
    ranked = sorted(((costs.prefetch_value(inp.layers[l].counts[e]), l, e)
                     for l, p in layers.items() for e in p.prefetch), key=lambda t: -t[0])
    chosen: dict[int, list[int]] = {l: [] for l in layers}
    for _, l, e in ranked[:affordable]:
        chosen[l].append(e)
    layers = {l: replace(p, prefetch=tuple(chosen[l])) for l, p in layers.items()}
    return RoundPlan(layers, round_objective(costs, inp, layers), "greedy")


# ---------------------------------------------------------------------------------------------
# The integer program


_mip_module = None


def load_mip():
    """python-mip, or None when the optional ``mip`` extra is not installed."""
    global _mip_module
    if _mip_module is None:
        try:
            _mip_module = importlib.import_module("mip")
        except ImportError:
            _mip_module = False
    return _mip_module or None


def solve_round_mip(costs: Costs, inp: RoundInput, solver: str = "CBC",
                    time_limit_ms: float = math.inf, start: RoundPlan | None = None,
                    gap: float = 0.0) -> RoundPlan | None:
    """Solve the round's program; None when python-mip is missing or finds no solution in time.

    ``start`` (a valid plan) is handed to the solver as its first incumbent; ``gap`` is the
    relative optimality gap at which to stop (0: prove optimality)."""
    mip = load_mip()
    if mip is None:
        return None
    began = time.perf_counter()
    model = mip.Model(sense=mip.MINIMIZE, solver_name=solver)
    model.verbose = 0
    model.threads = 1  # the runtime's own threads need the cores
    model.max_mip_gap = gap

    def at_least(variables, coeffs, const=0.0):  # Σ coeffs·variables + const ≥ 0
        model.add_constr(mip.LinExpr(variables, coeffs, const, mip.GREATER_OR_EQUAL))

    spans, moved, values, on_gpu, prefetch, hints = [], [], [], {}, {}, []
    for l, layer in inp.layers.items():
        span = model.add_var(lb=0.0)
        cpu_z, cpu_c, cpu_total, gpu_z, gpu_c, fetched = [], [], 0.0, [], [], []
        for (tokens, resident), members in group_experts(layer).items():
            size, key = len(members), (l, tuple(members))
            z = on_gpu[key] = model.add_var(var_type=mip.INTEGER, lb=0, ub=size)
            c, g = costs.cpu(tokens), costs.gpu(tokens)
            cpu_z.append(z)
            cpu_c.append(c)
            cpu_total += c * size
            gpu_z.append(z)
            gpu_c.append(-(g if resident else g + costs.fetch_ms))
            if resident:
                continue
            fetched.append(z)
            value = costs.prefetch_value(tokens)
            if value > 0:
                y = prefetch[key] = model.add_var(var_type=mip.INTEGER, lb=0, ub=size)
                at_least([z, y], [-1.0, -1.0], size)  # fetched now or prefetched, not both
                moved.append(y)
                values.append((y, value))
        at_least([span] + cpu_z, [1.0] + cpu_c, -cpu_total)  # T ≥ CPU side
        at_least([span] + gpu_z, [1.0] + gpu_c)  # T ≥ GPU side
        if costs.mem_ms:  # T ≥ one DRAM streaming every activated expert, copying fetched ones
            at_least([span] + fetched, [1.0] + [-2 * costs.mem_ms] * len(fetched),
                     -costs.mem_ms * len(layer.counts))
        moved += fetched
        spans.append(span)
        if start is not None:
            hints.append((span, layer_time(costs, layer, start[l].gpu)))

    objective = mip.LinExpr(spans + [y for y, _ in values],
                            [1.0] * len(spans) + [-v for _, v in values])
    if moved:
        at_least(moved, [-1.0] * len(moved), inp.free_slots)  # slots
        if math.isfinite(costs.fetch_ms):  # stall ≥ link time not hidden by the round + window
            stall = model.add_var(lb=0.0)
            at_least([stall] + spans + moved,
                     [1.0] * (1 + len(spans)) + [-costs.fetch_ms] * len(moved), inp.window_ms)
            objective.add_var(stall, 1.0)
    model.objective = objective

    if start is not None:
        model.start = hints + _start_values(start, on_gpu, prefetch)
    status = model.optimize(max_seconds=time_limit_ms / 1000.0)
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        return None
    layers = _plan_from_solution(costs, inp, on_gpu, prefetch)
    solve_ms = (time.perf_counter() - began) * 1000.0
    return RoundPlan(layers, round_objective(costs, inp, layers), "mip", solve_ms)


def _start_values(start: RoundPlan, on_gpu: dict, prefetch: dict) -> list:
    values = [(z, len(start[l].gpu.intersection(members))) for (l, members), z in on_gpu.items()]
    values += [(y, len(set(start[l].prefetch).intersection(members)))
               for (l, members), y in prefetch.items()]
    return values


def _plan_from_solution(costs: Costs, inp: RoundInput, on_gpu: dict,
                        prefetch: dict) -> dict[int, LayerPlan]:
    """Turn group counts back into experts: the first ``z`` members of a group run on the GPU,
    the next ``y`` are prefetched (members of a group are interchangeable)."""
    gpu: dict[int, set[int]] = {l: set() for l in inp.layers}
    pre: dict[int, list[tuple[float, int]]] = {l: [] for l in inp.layers}
    for (l, members), z in on_gpu.items():
        n_gpu = round(z.x or 0)
        gpu[l].update(members[:n_gpu])
        y = prefetch.get((l, members))
        if y is not None:
            value = costs.prefetch_value(inp.layers[l].counts[members[0]])
            pre[l] += ((-value, e) for e in members[n_gpu:n_gpu + round(y.x or 0)])
    layers = {}
    for l, layer in inp.layers.items():
        g = frozenset(gpu[l])
        layers[l] = LayerPlan(g, frozenset(layer.counts.keys() - g), g - layer.resident,
                              tuple(e for _, e in sorted(pre[l])))
    return layers


# ---------------------------------------------------------------------------------------------
# The runtime's interface


def as_counts(counts, quantize: bool = False) -> dict[int, float]:
    """Expert → tokens for the experts with tokens, from a mapping or a per-expert array.
    ``quantize`` rounds expected counts to whole tokens (what a verification pass can route),
    which also lets equal experts share a group in the program."""
    if isinstance(counts, Mapping):
        pairs = ((int(e), float(round(n)) if quantize else n) for e, n in counts.items())
        return {e: n for e, n in pairs if n > 0}
    arr = np.rint(counts) if quantize else np.asarray(counts)
    idx = np.flatnonzero(arr > 0)
    return dict(zip(idx.tolist(), arr[idx].tolist()))


def plan_round(costs: Costs, settings: BalancerSettings, inp: RoundInput,
               previous: RoundPlan | None) -> tuple[RoundPlan, list[tuple[str, str]]]:
    """One round's plan: the program warm-started from the previous round's plan and the greedy
    plan, or the better of those when the solver finds nothing in time. Also returns warnings
    as (reason, message) pairs."""
    began = time.perf_counter()
    start = greedy_round(costs, inp)
    if previous is not None:  # last round's split, repaired for this round's inputs
        start = min(start, greedy_round(costs, inp, seeds=previous.layers),
                    key=lambda p: p.objective_ms)
    limit = settings.time_limit_ms
    solved = solve_round_mip(costs, inp, settings.solver, limit, start, gap=SOLVER_GAP)
    elapsed = (time.perf_counter() - began) * 1000.0
    warnings = []
    if solved is None:
        warnings.append(("nosolution", f"the {settings.solver} solve found no solution in "
                                       f"{limit:g} ms; using the greedy plan"))
    elif elapsed > 2 * limit:
        warnings.append(("slow", f"a round's solve took {elapsed:.0f} ms against a {limit:g} ms "
                                 "limit (building the program is not limited)"))
    best = solved if solved is not None and solved.objective_ms <= start.objective_ms else start
    return replace(best, solve_ms=elapsed), warnings


def serve() -> None:
    """The solver process: reads pickled messages on stdin, writes plans on stdout.

    In: ("init", profile, expert_bytes), then ("solve", round_id, RoundInput) per round.
    Out: ("ready",) or ("unavailable", message); ("warn", reason, message); ("plan", id, plan).
    """
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the solver library prints must not corrupt the channel
    inbox = sys.stdin.buffer

    def send(*message) -> None:
        pickle.dump(message, channel)
        channel.flush()

    _, profile, expert_bytes = pickle.load(inbox)
    mip = load_mip()
    if mip is None:
        send("unavailable", "python-mip is not installed (pip install 'moe-spac[mip]'); "
                            "the balancer uses its greedy plan")
        return
    mip.Model(solver_name=profile.balancer.solver)  # loads the solver library: 0.1–0.7 s
    send("ready")
    costs, previous = Costs(profile, expert_bytes), None
    while True:
        try:
            _, round_id, inp = pickle.load(inbox)
        except EOFError:
            return
        previous, warnings = plan_round(costs, profile.balancer, inp, previous)
        for reason, message in warnings:
            send("warn", reason, message)
        send("plan", round_id, previous)


class _SolverProcess:
    """Runs ``serve`` in a child process and hands its plans to ``deliver``.

    A process, not a thread: python-mip builds each program in Python, and a thread doing that
    holds the GIL that the runtime needs between its ONNX Runtime calls (measured on the bench:
    layers ended 0.1–0.2 ms later, 2–5 % of a verify pass, against ≤ 2 % for the whole
    balancer). Only the
    newest round is solved: a round submitted while the solver is busy replaces any waiting one.
    """

    def __init__(self, profile: Profile, expert_bytes: int, deliver, warn):
        self._deliver, self._warn = deliver, warn
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from spac.runtime.balancer import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._lock = threading.Lock()
        self._busy = True  # until "ready"
        self._waiting: bytes | None = None
        self._write(pickle.dumps(("init", profile, expert_bytes)))
        self._reader = threading.Thread(target=self._read, name="spac-balancer", daemon=True)
        self._reader.start()

    def submit(self, round_id: int, inp: RoundInput) -> None:
        data = pickle.dumps(("solve", round_id, inp))
        with self._lock:
            if self._busy:
                self._waiting = data
                return
            self._busy = True
        self._write(data)

    def close(self) -> None:
        try:
            self._proc.stdin.close()  # EOF ends serve()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # stuck in a solve: the time limit did not hold
            self._proc.kill()
            self._proc.wait()
        self._reader.join()

    def _write(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the process ended: _read has said why

    def _read(self) -> None:
        while True:
            try:
                kind, *rest = pickle.load(self._proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                try:
                    code = self._proc.wait(timeout=5)  # its output ended: it is exiting
                except subprocess.TimeoutExpired:
                    code = None
                if code != 0:
                    self._warn("died", "the balancer's solver process ended unexpectedly; "
                                       "using the greedy plan")
                self._deliver(None, None)
                return
            if kind == "warn":
                self._warn(*rest)
            elif kind == "unavailable":
                self._warn("missing", rest[0])
            elif kind == "plan":
                self._deliver(*rest)
            if kind in ("ready", "plan"):
                with self._lock:
                    data, self._waiting = self._waiting, None
                    self._busy = data is not None
                if data is not None:
                    self._write(data)


class Balancer:
    """Plans each layer's CPU/GPU split for the runtime.

    ``submit`` the next round's expected inputs as soon as they are known (after the estimator's
    update, while the draft runs); a solver process solves the round's program. ``plan_for``
    on the critical path never waits: it repairs the solved plan for the layer's actual routing,
    or makes the greedy plan when no solved plan for the current round is ready.
    """

    def __init__(self, profile: Profile, num_layers: int, num_experts: int, expert_bytes: int):
        self.profile = profile
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.costs = Costs(profile, expert_bytes)
        self._cond = threading.Condition()
        self._round = 0
        self._solved: tuple[int, RoundPlan] | None = None
        self._warned: set[str] = set()
        self._solver: _SolverProcess | None = None
        self._solver_gone = False  # the process ended: greedy from then on
        if profile.has_gpu and profile.balancer.solver != "greedy":
            if importlib.util.find_spec("mip") is None:
                self._warn_once("missing", "python-mip is not installed (pip install "
                                           "'moe-spac[mip]'); the balancer uses its greedy plan")
            else:
                self._solver = _SolverProcess(profile, expert_bytes, self._deliver,
                                              self._warn_once)

    def submit(self, counts: Sequence, resident: Sequence[Iterable[int]], free_slots: int,
               window_ms: float = 0.0) -> None:
        """The next round's inputs: per layer the expected tokens per expert (a per-expert array
        or a mapping), the resident experts, the device slots the round may fill, and the link
        time hidden after the round (the next draft's duration)."""
        if len(counts) != self.num_layers or len(resident) != self.num_layers:
            raise ValueError(f"expected inputs for {self.num_layers} layers, got "
                             f"{len(counts)} counts and {len(resident)} resident sets")
        with self._cond:
            self._round += 1
        if self._solving():
            layers = {l: LayerInput(as_counts(counts[l], quantize=True), frozenset(resident[l]))
                      for l in range(self.num_layers)}
            self._solver.submit(self._round, RoundInput(layers, int(free_slots), window_ms))

    def plan_for(self, layer: int, counts, resident: Iterable[int],
                 free_slots: int = 0) -> LayerPlan:
        """The plan for ``layer`` given its actual routing (tokens per expert, as an array or a
        mapping), the resident experts and the slots free for fetching now. Never blocks."""
        actual = as_counts(counts)
        if not self.profile.has_gpu:
            return all_cpu_plan(actual)
        layer_in = LayerInput(actual, frozenset(resident))
        solved = self.solved_plan()
        if solved is None:
            if self._solving():
                self._warn_once("late", "no solved plan was ready when a layer needed one; "
                                        "using the greedy plan (the solve must finish within "
                                        "the draft: see balancer.time_limit_ms)")
            return greedy_layer(self.costs, layer_in, free_slots)
        seed = solved[layer]
        plan = greedy_layer(self.costs, layer_in, free_slots, seed.gpu)
        prefetch = tuple(e for e in seed.prefetch if e in plan.cpu and e not in layer_in.resident)
        return LayerPlan(plan.gpu, plan.cpu, plan.fetch, prefetch)

    def solved_plan(self) -> RoundPlan | None:
        """The solved plan of the latest submitted round, if it is ready."""
        solved = self._solved  # one read: the reader thread swaps the whole tuple
        return solved[1] if solved is not None and solved[0] == self._round else None

    def wait(self, timeout: float | None = None) -> RoundPlan | None:
        """Block until the latest submitted round is solved (benchmarks and tests)."""
        with self._cond:
            self._cond.wait_for(lambda: self.solved_plan() is not None or not self._solving(),
                                timeout)
        return self.solved_plan()

    def close(self) -> None:
        if self._solver is not None:
            self._solver.close()

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _deliver(self, round_id: int | None, plan: RoundPlan | None) -> None:
        with self._cond:
            if plan is None:
                self._solver_gone = True
            else:
                self._solved = (round_id, plan)
            self._cond.notify_all()

    def _solving(self) -> bool:
        return self._solver is not None and not self._solver_gone

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning(message)
