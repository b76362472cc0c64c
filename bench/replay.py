"""The trace replay: recorded routing (spac.bench.trace) fed through the runtime's own host
cache (spac.ops.host_cache: its admission, victim choice and static fill) and its prefetch
order (spac.ops.prefetcher), charged with a device profile's costs, to estimate tokens/s on
devices this machine is not. Its figures are MODELLED, not measured, and labelled so."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spac.ops.host_cache import HostCache, PassPosition, Slot
from spac.ops.prefetcher import PrefetchRequest
from spac.ops.stats import PagingStats

from .measure import CONFIGS

MODELLED = "MODELLED, not measured"


@dataclass(frozen=True)
class Scale:
    """The sizes the replay charges. Routing comes from the trace; each activated trace expert
    stands for top_k / trace top-k activated experts, in each of layers / trace layers layers,
    all with its hit or miss."""

    name: str
    expert_bytes: int
    trunk_bytes: int  # target weights streamed per pass besides the routed experts
    draft_bytes: int  # draft weights streamed per draft token
    layers: int  # MoE layers
    experts: int  # experts per MoE layer
    top_k: int
    draft_layers: int


def qwen3_30b_a3b() -> Scale:
    """Qwen3-30B-A3B in bf16 (48 layers, 128 experts of 3·2048·768, top-8, 32 query and 4 KV heads
    of 128, vocabulary 151936) with Qwen3-0.6B (bf16) as the draft."""
    hidden, layers, vocab = 2048, 48, 151936
    attention = hidden * 32 * 128 * 2 + hidden * 4 * 128 * 2  # q, o + k, v
    trunk = layers * (attention + hidden * 128) + vocab * hidden  # + router; + lm_head (embedding is a lookup)
    return Scale("qwen3-30b-a3b (bf16) + qwen3-0.6b draft", expert_bytes=3 * hidden * 768 * 2, trunk_bytes=2 * trunk,
                 draft_bytes=2 * 596_000_000, layers=layers, experts=128, top_k=8, draft_layers=28)


def package_scale(model: dict) -> Scale:
    return Scale(f"the package's own sizes ({model['bytes_per_expert'] / 1e6:.2f} MB per expert)", model["bytes_per_expert"],
                 model["trunk_bytes"], model["draft_bytes"], model["moe_layers"], model["num_experts"],
                 model["top_k"], model.get("draft_layers", 1))


class ReplayCache:
    """A HostCache under one policy whose slots hold only their keys, and the pass position its
    rules read (the frozen layer, the layers computed this pass). A capacity that holds every
    expert holds them all from the start (the runtime then loads every expert), whatever the
    policy."""

    def __init__(self, policy: str, capacity: int, shape: tuple[int, int], frequencies=None):
        layers, experts = shape
        self.position, self.paging = PassPosition(), PagingStats()
        self.host = HostCache(policy, capacity, self.position, self.paging)
        self.resident = capacity >= layers * experts
        if self.resident:
            self.host.slots.update(((l, e), Slot((l, e), 0.0)) for l in range(layers) for e in range(experts))
        elif policy == "static":
            self.host.fill_static(lambda *key: key, frequencies, list(range(layers)), experts)

    def at(self, layer: int | None, computed: set) -> HostCache:
        """The cache as seen while `layer` is computed (None: none, as while the draft runs)."""
        self.position.layer = -1 if layer is None else layer
        self.position.computed = computed
        return self.host


class HostTier:
    """The host tier behind a GPU's cache (GPU profiles only): LRU over the profile's host budget;
    None means it holds every expert."""

    def __init__(self, capacity: int | None):
        self.capacity, self.misses = capacity, 0
        self.cache = HostCache("lru", capacity or 0, PassPosition(), PagingStats())

    def read(self, key) -> bool:
        """True if the expert was in host memory; a miss is read from storage and kept."""
        if self.capacity is None or self.cache.get(key) is not None:
            return True
        self.misses += 1
        self.cache.admit(key, key, 0.0)
        return False


def stream_ms(profile, ep: str, tokens: float, nbytes: float, calls: int) -> float:
    """A dense pass over `nbytes` of weights with the profile's cost law for `ep`: `calls` call
    overheads + streaming + per-token arithmetic."""
    cost = profile.expert_costs[ep]
    return calls * cost.a_ms + nbytes / 1e6 * (cost.ms_per_mb + cost.b_ms_per_token_per_mb * tokens)


def slots_for(fraction: float, total: int) -> int:
    return int(math.floor(fraction * total + 1e-9))


def replay(trace: dict, policy: str, budget: float, profile, scale: Scale, estimator: str | None = None,
           frequencies=None) -> dict:
    """Model one policy at one budget on one profile from a recorded trace. MODELLED, not measured.

    The swept cache is the device tier on a profile with a GPU (the paper's "experts cached in
    VRAM"; the host tier keeps the profile's budget) and the host tier on a CPU-only profile.
    A round is the draft's γ tokens (the link prefetches meanwhile), then the target pass: each
    MoE layer after its share of the trunk. On a GPU, `lru` fetches every miss over the link and
    runs all experts on the GPU (MixtralOffload); `static` and `spac` split each layer between the
    GPU (cached experts) and the CPU (misses, from host RAM) with the balancer's greedy plan. On
    the CPU a miss is a storage read. `spac` prefetches, after each pass of a prompt decoded with
    a draft, the highest-utility experts over the link, one at a time, served as the prefetcher
    serves them (by layer, then utility), dropping a request whose layer has started (the pager's
    rules). Decode rounds are timed and counted; prefill and warm-up prompts only change the cache.
    """
    from spac.runtime.balancer import Costs, LayerInput, greedy_layer, layer_time
    from spac.runtime.estimator import make_estimator

    meta = trace["model"]
    L, E = meta["moe_layers"], meta["num_experts"]
    layer_mult = scale.layers / L
    call_mult = max(1, round(scale.top_k / meta["top_k"]))
    gpu = profile.has_gpu
    ep = "cuda" if gpu else "cpu"
    costs = Costs(profile, scale.expert_bytes)
    storage_ms = profile.transfer_ms(scale.expert_bytes, "storage_to_host")
    bundle = call_mult * layer_mult  # real experts per activated trace expert
    link_ms = (costs.fetch_ms if gpu else storage_ms) * bundle
    host = None
    if gpu:
        total = scale.expert_bytes * scale.layers * scale.experts
        host_bytes = profile.budget_bytes("host", total, scale.trunk_bytes)
        host = HostTier(None if host_bytes is None or host_bytes >= total else slots_for(host_bytes / total, L * E))
    est = make_estimator(estimator, L, E) if policy == "spac" else None
    cache = ReplayCache(policy, slots_for(budget, L * E), (L, E), frequencies)
    capacity = cache.host.capacity
    prefetching = policy == "spac" and capacity > 0 and not cache.resident
    queue: list[tuple[int, int]] = []  # next round's prefetches, in the order the prefetcher serves them
    in_flight = None  # (finish time, key): the worker reads one expert at a time
    link_free = 0.0
    totals = dict(seconds=0.0, tokens=0, rounds=0, hits=0, lookups=0, stall_ms=0.0, storage_ms=0.0,
                  issued=0, dropped=0)

    def utility(key) -> float:
        return float(est.utilities()[key]) if est is not None else 0.0

    def complete(frozen, computed):
        nonlocal in_flight
        key = in_flight[1]
        in_flight = None
        slots = cache.at(frozen, computed)
        if not slots.admit(key, key, utility(key), prefetched=True):
            totals["dropped"] += 1
        slots.release(key)

    def advance(until: float, layer: int | None, computed: set) -> None:
        """Run the prefetch worker until `until`; `layer` is the layer being computed meanwhile
        (None: the draft, after the last pass)."""
        nonlocal in_flight, link_free
        while True:
            if in_flight is not None:
                if in_flight[0] > until:
                    return
                complete(layer, computed)
            if not queue or max(link_free, 0.0) >= until:
                return
            key = queue.pop(0)
            if layer is not None and key[0] <= layer:  # its layer has started: stale
                totals["dropped"] += 1
                continue
            if not cache.at(layer, computed).reserve(key, utility(key)):
                continue
            read_ms = link_ms
            if host is not None and not host.read(key):
                read_ms += storage_ms * bundle
            link_free = max(link_free, 0.0) + read_ms
            in_flight = (link_free, key)

    def run_layer(l: int, counts: np.ndarray, computed: set) -> tuple[float, float, int, int]:
        """(ms for the real layers this trace layer stands for, of which storage reads, hits, lookups)."""
        active = [int(e) for e in np.flatnonzero(counts)]
        hits = [e for e in active if (l, e) in cache.host]
        misses = [e for e in active if (l, e) not in cache.host]
        for e in hits:
            cache.host.get((l, e))  # LRU order, and a first hit of a prefetched slot counts as used
        extra = 0.0  # storage reads on the critical path
        if not gpu:
            ms = sum(costs.cpu(float(counts[e])) for e in active) * call_mult + len(misses) * storage_ms * call_mult
            extra = len(misses) * storage_ms * call_mult
        else:
            expanded = {e * call_mult + j: float(counts[e]) for e in active for j in range(call_mult)}
            resident = frozenset(e * call_mult + j for e in hits for j in range(call_mult))
            inp = LayerInput(expanded, resident)
            if policy == "lru" and not cache.resident:
                plan_gpu = expanded.keys()  # every expert on the GPU, misses fetched first
            else:
                plan_gpu = greedy_layer(costs, inp, free_slots=0).gpu
            ms = layer_time(costs, inp, plan_gpu)
            extra = sum(storage_ms * call_mult for e in misses if not host.read((l, e)))
            ms += extra
        for e in misses:
            if policy != "lru" and gpu:
                break  # static/spac compute GPU misses on the CPU: nothing moves to the device
            cache.at(l, computed).admit((l, e), (l, e), utility((l, e)))
        return ms * layer_mult, extra * layer_mult, len(hits), len(active)

    for prompt in trace["prompts"]:
        counted = not prompt.get("warmup")
        produced = 0
        # As the pager: the highest utilities are prefetched only while a draft runs (PagedExperts.end_round)
        draft_follows = any(rnd["kind"] == "verify" for rnd in prompt["rounds"])
        for rnd in prompt["rounds"]:
            counts = np.asarray(rnd["counts"], dtype=np.int64)
            kind, T = rnd["kind"], rnd["tokens"]
            timed = counted and kind != "prefill"
            gamma = T - 1 if kind == "verify" else 0
            t = gamma * stream_ms(profile, ep, 1, scale.draft_bytes, scale.draft_layers)
            trunk_share = stream_ms(profile, ep, T, scale.trunk_bytes, scale.layers) / L
            computed = set(range(L))
            if prefetching:
                advance(t, None, computed)
            stall_total = 0.0
            for l in range(L):
                t += trunk_share
                computed = set(range(l))
                if prefetching:
                    advance(t, l - 1 if l else None, computed if l else set(range(L)))
                    if in_flight is not None and in_flight[1][0] == l and counts[l, in_flight[1][1]] > 0:
                        stall = in_flight[0] - t  # the layer needs the expert being read: wait
                        t += stall
                        stall_total += stall
                        link_free = t
                        complete(l, computed)
                ms, extra, hits, lookups = run_layer(l, counts[l], computed)
                t += ms
                stall_total += extra
                if timed:
                    totals["hits"] += hits
                    totals["lookups"] += lookups
            if est is not None:
                est.update(counts)
                if not cache.resident:
                    cache.host.set_utilities(est.utilities())
            if prefetching:
                totals["dropped"] += len(queue)
                utilities = est.utilities()
                wanted = []
                for flat in np.argsort(-utilities, axis=None, kind="stable")[:capacity if draft_follows else 0]:
                    key = divmod(int(flat), E)
                    if utilities[key] <= 0:
                        break
                    if key not in cache.host:
                        wanted.append(PrefetchRequest((key[0], -utilities[key]), utilities[key], 0, *key))
                queue = [(r.layer, r.expert) for r in sorted(wanted)]  # the prefetcher's serving order
                totals["issued"] += len(queue)
                link_free -= t
                if in_flight is not None:
                    in_flight = (in_flight[0] - t, in_flight[1])
            if timed:
                totals["seconds"] += t / 1000
                totals["rounds"] += 1
                totals["stall_ms"] += stall_total
                produced += (rnd["accepted"] or 0) + 1
        if counted:
            limit = prompt.get("new_tokens")
            totals["tokens"] += produced if limit is None else min(produced, max(limit - 1, 0))
    return {
        "tokens_per_second": totals["tokens"] / totals["seconds"] if totals["seconds"] else 0.0,
        "hit_rate": totals["hits"] / totals["lookups"] if totals["lookups"] else 1.0,
        "slots": capacity, "host_misses": host.misses if host else None,
        "prefetch": {"issued": totals["issued"], "used": cache.paging.prefetch_used, "dropped": totals["dropped"]},
        **{k: totals[k] for k in ("tokens", "rounds", "seconds", "stall_ms")},
    }



def replay_profile(traces: dict, profile_name: str, budgets, scale: Scale, frequencies) -> dict:
    """Every measured configuration, modelled on one profile at every budget."""
    from spac.runtime.profile import load_profile

    profile = load_profile(profile_name)
    out = {"note": MODELLED, "profile": profile.name, "description": profile.description,
           "swept_tier": "device" if profile.has_gpu else "host", "budgets": list(budgets), "policies": {}}
    for name, speculative, policy, estimator in CONFIGS:
        trace = traces["sd" if speculative else "no-sd"]
        out["policies"][name] = [
            {"budget": b, **replay(trace, policy, b, profile, scale, estimator, frequencies)} for b in budgets]
    return out
